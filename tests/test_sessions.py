"""Session lifetime: idle and absolute limits, sliding refresh, one round trip, TTL backstop."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis
import redis.asyncio as aioredis

from conftest import UA_FIREFOX, UA_IPHONE, Browser, CountedRedis, read_events, redis_major, scripts_run, serving
from sessionaudit import keys
from sessionaudit.app import make_app

pytestmark = pytest.mark.gen_test


async def test_idle_timeout_ends_session_with_expired_event(browser: Browser, clock, settings, rdb) -> None:
    await browser.register("idle@example.com")
    login = (await read_events(rdb))[-1]
    clock.advance(settings.session_idle - 1)
    assert (await browser.get("/account")).code == 200  # refreshed: deadline moves
    clock.advance(settings.session_idle - 1)
    assert (await browser.get("/account")).code == 200
    last_request_ms = int(clock.now * 1000)
    clock.advance(settings.session_idle + 5)
    r = await browser.get("/account")
    assert r.code == 302 and r.headers["Location"].startswith("/login")
    ended = [e for e in await read_events(rdb) if e.type == "expired"]
    assert len(ended) == 1
    assert ended[0].reason == "idle" and ended[0].session == login.session
    # `at` is the deadline (the last request plus the idle limit), not when it was noticed.
    assert ended[0].at == last_request_ms + settings.session_idle * 1000
    assert ended[0].user == "idle@example.com" and ended[0].ip is None


async def test_lifetime_ends_session_even_when_active(browser: Browser, clock, settings, rdb) -> None:
    await browser.register("life@example.com")
    login = (await read_events(rdb))[-1]
    step = settings.session_idle - 10
    while clock.now + step < login.at / 1000 + settings.session_lifetime:
        clock.advance(step)
        assert (await browser.get("/account")).code == 200
    clock.advance(step)
    assert (await browser.get("/account")).code == 302
    ended = [e for e in await read_events(rdb) if e.type == "expired"]
    assert [(e.reason, e.at) for e in ended] == [("lifetime", login.at + settings.session_lifetime * 1000)]


async def test_refresh_just_before_deadline_wins(browser: Browser, clock, settings, app, rdb) -> None:
    await browser.register("edge@example.com")
    clock.advance(settings.session_idle - 0.001)  # one millisecond before the deadline
    assert (await browser.get("/account")).code == 200
    clock.advance(0.002)  # past the old deadline, well inside the new one
    assert await app.ctx.sessions.expire_due() == (0, 0)
    assert (await browser.get("/account")).code == 200
    assert not [e for e in await read_events(rdb) if e.type == "expired"]


async def test_at_the_deadline_is_expired(browser: Browser, clock, settings, rdb) -> None:
    await browser.register("exact@example.com")
    clock.advance(settings.session_idle)
    assert (await browser.get("/account")).code == 302


async def test_redis_ttl_is_a_backstop_just_past_the_lifetime(browser: Browser, clock, settings, rdb) -> None:
    """The deadlines are the scripts' (and the sweeper's); Redis's own expiry only clears what outlives
    the lifetime, so a page view needs no write but its deadline's."""
    await browser.register("ttl@example.com")
    key = (await rdb.keys(keys.SESSION + "*"))[0]
    ttl = await rdb.pttl(key)
    assert settings.session_lifetime * 1000 < ttl <= (settings.session_lifetime + settings.session_ttl_slack) * 1000
    clock.advance(100)
    await browser.get("/account")
    assert await rdb.pttl(key) <= ttl


async def test_authenticated_page_costs_one_round_trip(browser: Browser, settings, clock, redis_url) -> None:
    """Counted two ways: requests sent by the client, and scripts (or functions) run by Redis."""
    counted = CountedRedis(redis_url)
    app = make_app(settings, counted, clock)
    # A second server on the counted client, beside the fixture app.
    try:
        async with serving(app) as base:
            b = Browser(browser.client, base)
            await b.register("rt@example.com")
            await b.get("/account")  # scripts loaded, connection warm
            info = await counted.info("commandstats")
            before_sent, before_eval = counted.sent, scripts_run(info)
            for i in range(10):  # every other page from another browser: each move is recorded in the same trip
                b.user_agent = UA_IPHONE if i % 2 == 0 else UA_FIREFOX
                assert (await b.get("/account")).code == 200
            info = await counted.info("commandstats")
            assert counted.sent - before_sent - 1 == 10  # minus the INFO itself
            assert scripts_run(info) - before_eval == 10
            moves = [e for e in await read_events(counted) if e.type == "session_changed"]
            assert len(moves) == 10 and {e.reason for e in moves} == {"browser"}
            anonymous = Browser(browser.client, base)
            before_sent = counted.sent
            for path in ("/", "/login", "/register"):
                assert (await anonymous.get(path)).code == 200
            assert counted.sent == before_sent  # anonymous pages: no Redis at all
    finally:
        await counted.close()


async def test_concurrent_requests_do_not_undo_each_other(browser: Browser, new_browser, clock, rdb) -> None:
    """Refreshes and a logout racing: the logout always wins, nothing resurrects the session."""
    await browser.register("race2@example.com")
    cookie = browser.cookies["sid"]
    others = []
    for _ in range(5):
        b = new_browser()
        b.cookies["sid"] = cookie
        others.append(b)
    await asyncio.gather(browser.logout(), *(b.get("/account") for b in others))
    assert await rdb.zcard(keys.DEADLINES) == 0
    assert await rdb.keys(keys.SESSION + "*") == []
    for b in others:
        assert (await b.get("/account")).code == 302
    ends = [e for e in await read_events(rdb) if e.type in ("logout", "expired", "revoked")]
    assert len(ends) == 1


async def test_disabled_user_cookie_is_anonymous(browser: Browser, rdb) -> None:
    await browser.register("dis@example.com")
    uid = (await rdb.hget(keys.EMAILS, "dis@example.com")).decode()
    await rdb.hset(keys.USER + uid, "disabled", "1")
    assert (await browser.get("/account")).code == 302


async def test_cookie_secret_rotation_keeps_people_logged_in(http_client, rdb, clock, settings) -> None:
    """Old secret 1, then secrets {1: old, 2: new}: old cookies still verify, new ones use key 2."""
    def app_with(secrets: dict[int, str]):
        return make_app(dataclasses.replace(settings, cookie_secret=secrets), rdb, clock)

    old, new = "old-secret-0123456789abcdef", "new-secret-0123456789abcdef"
    async with serving(app_with({1: old})) as base:
        b = Browser(http_client, base)
        await b.register("rot@example.com")
        cookie = b.cookies["sid"]
    async with serving(app_with({1: old, 2: new})) as base:
        b.base_url = base
        assert (await b.get("/account")).code == 200
        fresh = Browser(http_client, base)
        await fresh.login("rot@example.com")
        assert fresh.cookies["sid"].startswith("2|1:2|")  # signed with key version 2
    async with serving(app_with({2: new})) as base:  # key 1 retired: its cookies no longer verify
        late = Browser(http_client, base)
        late.cookies["sid"] = cookie
        assert (await late.get("/account")).code == 302


async def test_sessions_of_an_earlier_version_are_converted_at_start(browser: Browser, rdb, app, clock,
                                                                    settings) -> None:
    """Earlier versions kept a session as a hash (uid, last seen, lifetime deadline) and the user's
    sessions as a set: an upgrade converts them in place, and nobody is logged out."""
    await browser.register("old@example.com")
    before = (await browser.get("/account")).body
    [key] = await rdb.keys(keys.SESSION + "*")
    ref = key.decode().removeprefix(keys.SESSION)
    uid = (await rdb.get(key)).decode().split()[0]
    deadline = int(await rdb.zscore(keys.DEADLINES, ref))
    now = int(clock() * 1000)
    # The same session as the earlier version wrote it.
    await rdb.delete(key, keys.USER_SESSIONS + uid)
    await rdb.hset(keys.LEGACY_SESSION + ref, mapping={"u": uid, "l": now, "x": now + settings.session_lifetime * 1000})
    await rdb.pexpire(keys.LEGACY_SESSION + ref, deadline - now + 60_000)
    await rdb.sadd(keys.LEGACY_USER_SESSIONS + uid, ref)
    assert await app.ctx.sessions.migrate() == 1
    assert await app.ctx.sessions.migrate() == 0  # done once
    assert not await rdb.exists(keys.LEGACY_SESSION + ref, keys.LEGACY_USER_SESSIONS + uid)
    page = await browser.get("/account")
    assert page.code == 200 and b"127.0.0.1" in page.body and b"Firefox 120" in page.body
    assert page.body.count(b"This device") == before.count(b"This device") == 1
    clock.advance(settings.session_idle + 1)
    await app.ctx.sessions.expire_due()
    [expired] = [e for e in await read_events(rdb) if e.type == "expired"]
    assert (expired.session, expired.reason) == (ref, "idle")


async def test_concurrent_pages_share_a_pipeline_and_each_gets_its_own_session(http_client, settings, clock,
                                                                               redis_url) -> None:
    """Pages loaded at the same time send their scripts together: fewer writes from the client, one
    script (one round trip) per page in Redis, and every page its own user."""
    counted = CountedRedis(redis_url)
    app = make_app(settings, counted, clock)
    try:
        async with serving(app) as base:
            browsers = [Browser(http_client, base) for _ in range(20)]
            for i, b in enumerate(browsers):
                await b.register(f"p{i}@example.com")
                await b.get("/account")
            before_sent = counted.sent
            before = scripts_run(await counted.info("commandstats"))
            pages = await asyncio.gather(*(b.get("/account") for b in browsers))
            after = scripts_run(await counted.info("commandstats"))
            assert [p.code for p in pages] == [200] * 20
            assert all(f"p{i}@example.com".encode() in p.body for i, p in enumerate(pages))
            assert after - before == 20  # a script a page (the INFO is none)
            assert counted.sent - before_sent - 1 < 20  # but fewer writes to Redis than pages
    finally:
        await counted.close()


async def test_the_page_is_a_function_loaded_once_and_again_after_a_flush(browser: Browser, app, redis_url) -> None:
    """On Redis 7 the authenticated page's script runs as a function (its prelude built once, not at
    every page). Should the function go (FUNCTION FLUSH, a new primary), the next page loads it again."""
    admin = redis.Redis.from_url(redis_url)
    try:
        await browser.register("fn@example.com")
        assert (await browser.get("/account")).code == 200
        touch = app.ctx.sessions.scripts.touch
        if redis_major(admin) < 7:  # no functions: the same page, as a script
            assert touch.function == ""
            return
        assert touch.function and admin.function_list(library=touch.function)
        admin.function_flush()
        page = await browser.get("/account")
        assert page.code == 200 and b"fn@example.com" in page.body
        assert admin.function_list(library=touch.function)
    finally:
        admin.close()


async def test_a_redis_user_that_may_not_use_functions_gets_the_same_pages(http_client, settings, clock,
                                                                          redis_url) -> None:
    """An ACL written before the site used functions (or Redis 6): the page runs as a script instead."""
    admin = redis.Redis.from_url(redis_url)
    version = redis_major(admin)
    admin.execute_command("ACL", "SETUSER", "nofunctions", "on", ">pw", "~*", "&*", "+@all",
                          *(["-fcall", "-function"] if version >= 7 else []))
    client = aioredis.Redis.from_url(redis_url.replace("redis://", "redis://nofunctions:pw@"))
    app = make_app(settings, client, clock)
    try:
        async with serving(app) as base:
            b = Browser(http_client, base)
            assert (await b.register("nofn@example.com")).code == 303
            for _ in range(2):
                page = await b.get("/account")
                assert page.code == 200 and b"nofn@example.com" in page.body
            assert app.ctx.sessions.scripts.touch.function == ""
            if version >= 7:
                assert not admin.function_list()
    finally:
        await client.aclose()
        admin.execute_command("ACL", "DELUSER", "nofunctions")
        admin.close()
