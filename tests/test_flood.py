"""Floods must not fill Redis: refused attempts are counted, dictionaries go with retention."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest

from conftest import PASSWORD, Browser, read_events, register_admin, serving
from sessionaudit import keys, throttle
from sessionaudit.app import make_app
from sessionaudit.audit import AuditLog

pytestmark = pytest.mark.gen_test(timeout=120)


async def used_memory(rdb) -> int:
    return (await rdb.info("memory"))["used_memory"]


async def test_a_throttled_flood_with_new_user_agents_costs_bounded_memory(http_client, base_url, rdb, app, clock,
                                                                          settings, new_browser) -> None:
    """The attack measured on 2026-11-30: 861 bytes per refused attempt. Now: a summary per window."""
    owner = new_browser()
    await owner.register("target@example.com")
    await owner.logout()
    attacker = Browser(http_client, base_url)
    # A first flood on another account: Redis allocates per-command statistics and connection
    # buffers the first time each is used, which is not what this measures.
    for i in range(settings.login_account_threshold + 50):
        attacker.user_agent = f"warm-up {i}"
        await attacker.login("warmup@example.com", "guess guess guess")
    clock.advance(settings.login_backoff_max)
    await app.ctx.throttle.flush_due()
    for _ in range(settings.login_account_threshold):
        assert (await attacker.login("target@example.com", "guess guess guess")).code == 401
    await attacker.get("/login")
    events_before = await rdb.xlen(keys.AUDIT)
    before = await used_memory(rdb)
    for i in range(1000):
        attacker.user_agent = f"Mozilla/5.0 flood-{i} " + "x" * 2048
        r = await attacker.post("/login", {"email": "target@example.com", "password": "guess guess guess"})
        assert r.code == 429
    grown = await used_memory(rdb) - before
    assert grown <= 150_000, f"{grown} bytes for 1,000 refused attempts"
    assert await rdb.xlen(keys.AUDIT) - events_before == 1  # the first refused attempt, as it came

    # Once the window is over the sweeper records the rest as one summary.
    clock.advance(settings.login_backoff_max)
    assert await app.ctx.throttle.flush_due() == 1
    throttled = [e for e in await read_events(rdb) if e.type == "login_failed" and e.reason == "throttled"
                 and e.user == "target@example.com"]
    assert [e.count for e in throttled] == [1, 999]
    summary = throttled[1]
    assert summary.user == "target@example.com" and summary.ip == "127.0.0.1"
    assert summary.user_agent.startswith("Mozilla/5.0 flood-999 ") and len(summary.user_agent) == 512
    assert summary.first is not None and summary.first <= summary.at
    assert 970 <= summary.agents <= 1030  # distinct user agents (a HyperLogLog: about 1 % off)
    assert summary.to_json()["count"] == 999 and summary.to_json()["distinct_user_agents"] == summary.agents
    # The throttle state is gone with the window; only the two events remain of the flood.
    assert await rdb.zcard(keys.THROTTLE_DUE) == 0

    # Every attempt still counts on the dashboard.
    admin = new_browser()
    await register_admin(admin, rdb, "admin@example.com")
    page = (await admin.get("/admin")).body.decode()
    failures = 2 * settings.login_account_threshold + 50 + 1000  # the warm-up's too
    assert f'id="stat-failures">{failures}<' in page

    # The export carries the count.
    exported = (await admin.get("/admin/audit.ndjson?user=target%40example.com&type=login_failed")).body.decode()
    rows = exported.splitlines()
    assert '"count":999' in rows[0] and '"count"' not in rows[1]
    csv_rows = (await admin.get("/admin/audit.csv?user=target%40example.com&type=login_failed")).body.decode()
    csv_rows = csv_rows.splitlines()
    assert csv_rows[0].endswith(",count") and csv_rows[1].endswith(",999") and csv_rows[2].endswith(",1")


async def test_a_continuing_flood_gets_one_summary_per_window(http_client, base_url, rdb, app, clock,
                                                             settings, new_browser) -> None:
    owner = new_browser()
    await owner.register("busy@example.com")
    await owner.logout()
    attacker = Browser(http_client, base_url)
    for _ in range(settings.login_account_threshold):
        await attacker.login("busy@example.com", "guess guess guess")
    for _ in range(3):  # three stretches, each refused ten times
        for _ in range(10):
            assert (await attacker.login("busy@example.com", "guess guess guess")).code == 429
        clock.advance(settings.login_backoff_max)
        assert (await attacker.login("busy@example.com", "guess guess guess")).code == 401  # the wait is over
    await app.ctx.throttle.flush_due()
    throttled = [e.count for e in await read_events(rdb) if e.type == "login_failed" and e.reason == "throttled"]
    assert throttled == [1, 9] * 3


async def test_a_flood_from_ever_new_addresses_is_bounded_per_minute(http_client, rdb, clock, settings) -> None:
    """Registration probes from a new address each time never reach the per-address threshold: the
    door's budget of events a minute bounds what they write."""
    settings = dataclasses.replace(settings, xheaders=True, door_budget=20)
    app = make_app(settings, rdb, clock)
    async with serving(app, xheaders=True) as base:
        owner = Browser(http_client, base)
        await owner.register("taken@example.com")
        prober = Browser(http_client, base)
        await prober.get("/login")
        before = await rdb.xlen(keys.AUDIT)
        probe = {"email": "taken@example.com", "password": PASSWORD, "password_confirm": PASSWORD}
        for i in range(300):
            r = await prober.post("/register", probe, headers={"X-Forwarded-For": f"10.{i // 250}.{i % 250}.1"})
            assert r.code == 400  # answered as always: the account exists
        assert await rdb.xlen(keys.AUDIT) - before == 21  # the budget, then one as it came, the rest counted
        clock.advance(61)
        await app.ctx.throttle.flush_due()
        failed = [e for e in await read_events(rdb) if e.type == "register_failed"]
        assert sum(e.count for e in failed) == 300 and failed[-1].count == 279


async def test_a_flood_kept_up_all_day_is_bounded_per_day(http_client, rdb, clock, settings) -> None:
    """A door's budget a minute, kept up all day, was still 864,000 events a day (about 1 KB each with a
    new user agent, kept for the retention). A door also records at most 30 minutes' budget a day one
    by one; past that, each minute is one event as it came and one summary with the count."""
    settings = dataclasses.replace(settings, xheaders=True, door_budget=2)
    app = make_app(settings, rdb, clock)
    clock.next_day()  # the 40 minutes below within one day
    async with serving(app, xheaders=True) as base:
        owner = Browser(http_client, base)
        await owner.register("taken@example.com")
        prober = Browser(http_client, base)
        await prober.get("/login")
        probe = {"email": "taken@example.com", "password": PASSWORD, "password_confirm": PASSWORD}
        written, n = [], 0
        for _ in range(40):
            before = await rdb.xlen(keys.AUDIT)
            for _ in range(5):
                r = await prober.post("/register", probe, headers={"X-Forwarded-For": f"10.{n // 250}.{n % 250}.1"})
                assert r.code == 400
                n += 1
            clock.advance(60)
            await app.ctx.throttle.flush_due()
            written.append(await rdb.xlen(keys.AUDIT) - before)
        # 30 minutes of the budget (2) recorded one by one, with one as it came and a summary of 2 each;
        # then only one as it came and a summary of 4 a minute.
        assert written == [4] * 30 + [2] * 10
        failed = [e for e in await read_events(rdb) if e.type == "register_failed"]
        assert sum(e.count for e in failed) == 200


async def test_a_days_junk_does_not_summarise_a_real_accounts_events(rdb, clock, settings, new_browser) -> None:
    """The day's budget is for events that name no account: junk that used it up (reset requests for
    emails without an account) must not turn a real account's events into summaries for the rest of
    the day (a review of the daily budget)."""
    app = make_app(dataclasses.replace(settings, door_budget=2), rdb, clock)
    clock.next_day()  # the minutes below within one day
    await new_browser().register("real@example.com")
    n = 0
    for _ in range(30):  # 30 minutes of the budget: the day's 60 events that name no account
        for _ in range(2):
            await app.ctx.resets.request(f"nobody{n}@example.com", ip=f"2001:db8:{n}::1", user_agent="junk")
            n += 1
        clock.advance(60)
    await app.ctx.resets.request(f"nobody{n}@example.com", ip=f"2001:db8:{n}::1", user_agent="junk")
    await app.ctx.resets.request("real@example.com", ip="2001:db8:ffff::1", user_agent="owner")
    # Recorded as itself, at once (not counted into the minute's summary, written when it is over).
    [*_, junk, real] = await read_events(rdb)
    assert (junk.user, junk.first) == (f"nobody{n}@example.com", None)  # the minute's first, as it came
    assert (real.type, real.user, real.count, real.first) == ("password_reset_requested", "real@example.com", 1, None)
    app.ctx.close()


async def test_failed_logins_from_ever_new_emails_and_addresses_are_bounded_per_minute(http_client, rdb, clock,
                                                                                       settings) -> None:
    """A second review guessed from 200 addresses with a new email each time: no key ever reached a
    threshold, so every failure was an event (600 B each). Past the budget they are summarised."""
    settings = dataclasses.replace(settings, xheaders=True, door_budget=20)
    app = make_app(settings, rdb, clock)
    async with serving(app, xheaders=True) as base:
        guesser = Browser(http_client, base)
        await guesser.get("/login")
        before = await rdb.xlen(keys.AUDIT)
        for i in range(300):
            r = await guesser.post("/login", {"email": f"guess{i}@example.com", "password": "wrong password!"},
                                   headers={"X-Forwarded-For": f"10.{i // 250}.{i % 250}.1"})
            assert r.code == 401  # answered as always
        assert await rdb.xlen(keys.AUDIT) - before == 21  # the budget, then one as it came, the rest counted
        # Guesses at a real account, hidden in the junk, are each recorded (its own throttle bounds them).
        owner = Browser(http_client, base)
        await owner.register("real@example.com")
        for i in range(3):
            r = await guesser.post("/login", {"email": "real@example.com", "password": "wrong password!"},
                                   headers={"X-Forwarded-For": f"10.9.9.{i}"})
            assert r.code == 401
        real = [e for e in await read_events(rdb) if e.type == "login_failed" and e.user == "real@example.com"]
        assert [(e.reason, e.count, e.ip) for e in real] == [("bad_credentials", 1, f"10.9.9.{i}") for i in range(3)]
        clock.advance(61)
        await app.ctx.throttle.flush_due()
        failed = [e for e in await read_events(rdb) if e.type == "login_failed" and e.user != "real@example.com"]
        assert sum(e.count for e in failed) == 300 and failed[-1].count == 279
        assert failed[-1].user == "guess299@example.com" and failed[-1].reason == "throttled"
        assert [e.reason for e in failed] == ["bad_credentials"] * 20 + ["throttled"] * 2
        admin = Browser(http_client, base)
        await register_admin(admin, rdb, "root@example.com")
        dashboard = (await admin.get("/admin")).body.decode()
        assert re.search(r'id="stat-failures">303<', dashboard), "the dashboard counts every failure"


async def test_retention_drops_user_agent_dictionaries_with_their_days(browser: Browser, new_browser, rdb, app,
                                                                      clock) -> None:
    audit = AuditLog(rdb)
    for day in range(3):
        b = new_browser(user_agent=f"Agent of day {day}")
        await b.register(f"day{day}@example.com")
        await app.ctx.seals.seal_once()  # retention removes whole sealed batches (test_seal.py)
        clock.advance(86_400)
    days = sorted(int(k.decode().rsplit(":", 1)[1]) for k in await rdb.keys(keys.AGENTS + "*"))
    assert len(days) == 3
    # Keep the last day: the two older days' events go, and their dictionaries with them.
    cutoff = days[2] * 86_400_000
    while await audit.trim_step(cutoff):
        pass
    left = sorted(int(k.decode().rsplit(":", 1)[1]) for k in await rdb.keys(keys.AGENTS + "*"))
    assert left == [days[2]]
    events = await read_events(rdb)
    assert {e.user_agent for e in events} == {"Agent of day 2"}


async def test_a_trim_that_empties_the_trail_leaves_no_dictionary_and_no_empty_user_index(new_browser, rdb, app,
                                                                                           clock) -> None:
    """A review (an operator's question: is every key cleaned up when what it belongs to ends?) found
    that a trim removing every event kept the dictionary of the last day it trimmed, one more each time
    the trail ran empty (a site idle for longer than its retention), and every user's index stream,
    empty, for ever (about 380 B an account)."""
    audit = AuditLog(rdb)
    for cycle in range(2):
        b = new_browser(user_agent=f"Agent of cycle {cycle}")
        await b.register(f"c{cycle}@example.com")
        await b.logout()
        await app.ctx.seals.seal_once()
        clock.advance(86_400)
        while await audit.trim_step(int(clock() * 1000)):
            pass
        assert await rdb.xlen(keys.AUDIT) == 0
        assert [k async for k in rdb.scan_iter(keys.AGENTS + "*")] == []
        assert [k async for k in rdb.scan_iter(keys.AUDIT_USER + "*")] == []
    # The accounts are still there, and their trails start again with their next event.
    b = new_browser()
    assert (await b.login("c0@example.com")).code == 303
    uid = (await rdb.hget(keys.EMAILS, "c0@example.com")).decode()
    assert [f[b"t"] for _, f in await rdb.xrange(keys.AUDIT_USER + uid)] == [b"login"]
    assert [e.user_agent for e in await read_events(rdb)] == [b.user_agent]


async def test_the_dictionary_of_earlier_versions_goes_once_no_kept_event_names_it(rdb, app, clock,
                                                                                  new_browser) -> None:
    await rdb.hset(keys.LEGACY_AGENTS, "0123456789ab", "An old browser")
    await rdb.xadd(keys.AUDIT, {"v": "1", "t": "login_failed", "a": "", "u": "", "e": "old@example.com", "s": "",
                                "i": "10.0.0.9", "g": "0123456789ab", "r": "bad_credentials", "c": ""},
                   id=f"{int(clock() * 1000) - 5000}-0")
    await rdb.set(keys.LEGACY_AGENTS_UNTIL, int(clock() * 1000))  # what the first start after the upgrade writes
    await app.ctx.seals.seal_once()
    await new_browser().register("new@example.com")
    await app.ctx.seals.seal_once()
    [old, *_] = await read_events(rdb)
    assert old.user_agent == "An old browser"  # still read from the old dictionary
    await AuditLog(rdb).trim_step(int(clock() * 1000))  # removes the old event only
    assert not await rdb.exists(keys.LEGACY_AGENTS) and not await rdb.exists(keys.LEGACY_AGENTS_UNTIL)
    assert [e.type for e in await read_events(rdb)] == ["register", "login"]


async def test_attempts_arriving_together_when_a_wait_ends_get_one_try(http_client, base_url, rdb, clock,
                                                                       settings, new_browser) -> None:
    """Every attempt already in flight used to pass the check before the first failure was recorded:
    an attacker with C connections got C guesses per backoff window."""
    owner = new_browser()
    await owner.register("target@example.com")
    await owner.logout()
    attackers = [Browser(http_client, base_url) for _ in range(8)]
    for _ in range(settings.login_account_threshold):
        await attackers[0].login("target@example.com", "guess guess guess")
    for b in attackers:
        await b.get("/login")
    clock.advance(settings.login_backoff_max)  # the wait is over
    results = await asyncio.gather(*(b.post("/login", {"email": "target@example.com", "password": "guess guess"})
                                      for b in attackers))
    assert sorted(r.code for r in results) == [401] + [429] * 7


async def test_counters_of_a_kind_are_capped_and_the_oldest_go_first(rdb, app, clock) -> None:
    """A flood of ever new emails (or addresses) creates at most 20,000 counters of a kind; the ones
    pushed out are those whose last failure is oldest, never one that is failing now."""
    flood = keys.Script(rdb, throttle.LUA + """
local now = tonumber(ARGV[1])
throttle_fail('sa:f:pa:target@example.com', now, 900000)
for i = 1, tonumber(ARGV[2]) do
  throttle_fail('sa:f:pa:x' .. i .. '@example.com', now + i, 900000)
  if i % 5000 == 0 then throttle_fail('sa:f:pa:target@example.com', now + i, 900000) end
end
return redis.call('ZCARD', 'sa:f:ix:pa')""")
    now = int(clock() * 1000)
    assert await flood([now, 25_000]) == 20_000
    assert await rdb.hget("sa:f:pa:target@example.com", "n") == b"6"  # failing all along: kept
    assert not await rdb.exists("sa:f:pa:x1@example.com") and await rdb.exists("sa:f:pa:x25000@example.com")
    kept = 0
    async for _ in rdb.scan_iter(match="sa:f:pa:*", count=5000):
        kept += 1
    assert kept == 20_000  # the target among them


async def test_refused_attempts_wait_only_while_the_site_is_busy(http_client, rdb, clock, settings) -> None:
    """A client flooding refused attempts on several connections gets its answers slowly (and so
    sends fewer), one that tries now and then gets them at once; the answers are the same."""
    settings = dataclasses.replace(settings, refusal_delay=0.5)
    app = make_app(settings, rdb, clock)
    async with serving(app) as base:
        owner = Browser(http_client, base)
        await owner.register("target@example.com")
        await owner.logout()
        attackers = [Browser(http_client, base) for _ in range(8)]
        for _ in range(settings.login_account_threshold):
            await attackers[0].login("target@example.com", "guess guess guess")
        for b in attackers:
            await b.get("/login")
        loop = asyncio.get_running_loop()
        started = loop.time()
        one = await attackers[0].login("target@example.com", "guess guess guess")
        alone = loop.time() - started
        assert one.code == 429 and alone < 0.4
        started = loop.time()
        many = await asyncio.gather(*(b.login("target@example.com", "guess guess guess") for b in attackers))
        assert [r.code for r in many] == [429] * 8 and all(r.headers["Retry-After"] for r in many)
        assert loop.time() - started >= 0.5
