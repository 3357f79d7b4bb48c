"""The audit trail: every event type, atomic writes, admin pages, paging, filters, exports, verify."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from conftest import Browser, admin_browser, read_events
from sessionaudit import keys
from sessionaudit.audit import AuditLog, Query

pytestmark = pytest.mark.gen_test

XSS_UA = 'Mozilla/5.0 <script>alert("ua")</script><img src=x onerror=alert(1)>'


async def test_every_event_type_with_its_fields(browser: Browser, new_browser, rdb, app, clock, settings) -> None:
    admin = await admin_browser(new_browser, rdb)
    await browser.register("u@example.com")  # register, login
    await browser.logout()  # logout
    await browser.login("u@example.com")  # login
    phone = new_browser()
    await phone.login("u@example.com")  # login on a second device
    for _ in range(settings.login_account_threshold):  # login_failed, and locked_out at the threshold
        await new_browser().login("u@example.com", "not the right password")
    clock.advance(settings.session_idle - 1)
    await browser.get("/account")
    await admin.get("/account")
    clock.advance(2)  # the phone idles out; the others were just refreshed
    assert await app.ctx.sessions.expire_due() == (1, 1000)
    listing = await admin.get("/admin/sessions?user=u%40example.com")
    refs = re.findall(rb'/admin/sessions/([A-Za-z0-9_-]{16})/revoke', listing.body)
    assert len(refs) == 1
    own = admin.cookies["sid"]
    assert (await admin.post(f"/admin/sessions/{refs[0].decode()}/revoke")).code == 303  # revoked by admin
    assert admin.cookies["sid"] == own
    assert (await browser.get("/account")).code == 302
    evs = await read_events(rdb)
    by_type: dict[str, list] = {}
    for e in evs:
        by_type.setdefault(e.type, []).append(e)
    assert set(by_type) == {"register", "login", "logout", "login_failed", "locked_out", "expired", "revoked"}
    login = by_type["login"][1]
    assert login.user == "u@example.com" and login.ip == "127.0.0.1" and "Firefox" in login.user_agent
    assert login.session and len(login.session) == 16 and login.reason == "password"
    # The stream names a user agent by a key into the dictionary; readers put the text back.
    raw = (await rdb.xrange(keys.AUDIT, login.id, login.id))[0][1][b"g"]
    assert re.fullmatch(rb"[0-9a-f]{12}", raw)
    assert (await rdb.hget(keys.agents_key(login.id), raw)).decode() == login.user_agent
    assert by_type["login_failed"][0].reason == "bad_credentials" and by_type["login_failed"][0].session is None
    assert len(by_type["locked_out"]) == 1
    expired = by_type["expired"][0]
    assert expired.reason == "idle" and expired.ip is None and expired.user_agent is None
    revoked = by_type["revoked"][0]
    assert revoked.reason == "admin" and revoked.actor == "root@example.com"
    # Exported shape: the contract's fields, `at` in ISO 8601 UTC with milliseconds.
    exported = revoked.to_json()
    assert list(exported) == ["id", "type", "at", "user", "session", "ip", "user_agent", "reason", "actor"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", exported["at"])
    # The session reference is not the cookie's id.
    for b in (phone, admin):
        assert all(e.session not in b.cookies["sid"] for e in evs if e.session)


@pytest.mark.parametrize("action", ["register", "login", "logout", "expire"])
async def test_state_and_event_are_written_together_or_not_at_all(browser: Browser, new_browser, rdb, app,
                                                                   clock, settings, action) -> None:
    """The event cannot be written (the stream key is broken): the state does not change either."""
    if action != "register":
        await browser.register("atomic@example.com")
    if action == "login":
        await browser.logout()

    def snapshot_keys():
        return rdb.keys("sa:*")

    before_keys = sorted(await snapshot_keys())
    before_sessions = await rdb.zrange(keys.DEADLINES, 0, -1)
    before_users = await rdb.hgetall(keys.EMAILS)
    saved = await rdb.dump(keys.AUDIT)
    await rdb.delete(keys.AUDIT)
    await rdb.set(keys.AUDIT, "not a stream")  # every XADD to it now fails
    if action == "register":
        r = await browser.register("atomic@example.com")
        assert r.code == 500 and b"Traceback" not in r.body
    elif action == "login":
        r = await browser.login("atomic@example.com")
        assert r.code == 500
    elif action == "logout":
        r = await browser.logout()
        assert r.code == 500
    else:
        clock.advance(settings.session_idle + 1)
        with pytest.raises(Exception, match="WRONGTYPE"):
            await app.ctx.sessions.expire_due()
    assert await rdb.zrange(keys.DEADLINES, 0, -1) == before_sessions
    assert await rdb.hgetall(keys.EMAILS) == before_users
    assert sorted(await snapshot_keys()) == before_keys
    await rdb.delete(keys.AUDIT)
    if saved:
        await rdb.restore(keys.AUDIT, 0, saved)
    assert (await app.ctx.audit.verify()).problems == []  # every live session still has its story


async def test_out_of_memory_writes_nothing(browser: Browser, rdb, redis_server) -> None:
    """Redis refuses a script's first write when over maxmemory (noeviction): nothing half-written."""
    await browser.get("/register")
    await rdb.config_set("maxmemory", 1)
    try:
        r = await browser.register("oom@example.com")
        assert r.code in (500, 503)
    finally:
        await rdb.config_set("maxmemory", 0)
    assert await rdb.hlen(keys.EMAILS) == 0
    assert await rdb.exists(keys.AUDIT) == 0


async def test_pagination_walks_every_event_once(rdb, app, new_browser) -> None:
    admin = await admin_browser(new_browser, rdb)
    users = app.ctx.users
    for i in range(57):
        await users.create(f"p{i}@example.com", "x", ip="10.0.0.1", user_agent="ua")
    all_ids = [e.id for e in reversed(await read_events(rdb))]
    seen: list[str] = []
    url = "/admin/audit?limit=10"
    pages = 0
    while url:
        page = await admin.get(url)
        assert page.code == 200
        seen += [m.decode() for m in re.findall(rb'<tr id="ev-([0-9]+-[0-9]+)"', page.body)]
        older = re.search(rb'<a rel="next" href="([^"]+)"', page.body)
        url = older.group(1).decode().replace("&amp;", "&") if older else ""
        pages += 1
    assert seen == all_ids  # newest first, no gap, no duplicate
    assert pages == 6  # 59 events: 57 and the admin's register and login
    # And back up with the Newer links.
    back: list[str] = []
    url = f"/admin/audit?limit=10&after={all_ids[-1]}"
    first = True
    while url:
        page = await admin.get(url)
        ids = [m.decode() for m in re.findall(rb'<tr id="ev-([0-9]+-[0-9]+)"', page.body)]
        back = ids + back
        newer = re.search(rb'<a rel="prev" href="([^"]+)"', page.body)
        url = newer.group(1).decode().replace("&amp;", "&") if newer else ""
        first = False
    assert not first
    assert back == all_ids[:-1]


async def test_filters(rdb, app, new_browser, browser, clock) -> None:
    admin = await admin_browser(new_browser, rdb)
    await browser.register("f1@example.com")
    clock.advance(200)
    await new_browser().login("f1@example.com", "wrong password is wrong")
    await browser.logout()
    audit: AuditLog = app.ctx.audit
    by_user = await audit.page(Query(user="f1@example.com"))
    assert [e.type for e in by_user.events] == ["logout", "login_failed", "login", "register"]
    by_type = await audit.page(Query(type="login"))
    assert {e.user for e in by_type.events} == {"f1@example.com", "root@example.com"}
    both = await audit.page(Query(user="f1@example.com", type="login_failed"))
    assert [e.type for e in both.events] == ["login_failed"]
    start = (await read_events(rdb))[0].at
    since = await audit.page(Query(since=start + 100_000))
    assert [e.type for e in since.events] == ["logout", "login_failed"]
    until = await audit.page(Query(until=start + 100_000))
    assert all(e.at <= start + 100_000 for e in until.events) and len(until.events) == 4
    inclusive = await audit.page(Query(since=start, until=start))
    assert all(e.at == start for e in inclusive.events) and inclusive.events
    # Through the page: the same filters as query arguments.
    r = await admin.get("/admin/audit?user=f1%40example.com&type=login_failed")
    assert r.code == 200 and r.body.count(b'<tr id="ev-') == 1
    empty = await admin.get("/admin/audit?user=nobody%40example.com")
    assert b"No events match" in empty.body


@pytest.mark.parametrize("query", ["type=party", "since=yesterday", "until=2026-13-45", "before=abc",
                                   "limit=-1", "limit=x", "since=2026-02-01&until=2026-01-01"])
async def test_invalid_filters_are_400(rdb, new_browser, query: str) -> None:
    admin = await admin_browser(new_browser, rdb)
    for path in ("/admin/audit", "/admin/audit.ndjson", "/admin/audit.csv"):
        r = await admin.get(f"{path}?{query}")
        assert r.code == 400, path
        assert b"Traceback" not in r.body


async def test_limit_is_capped(rdb, app, new_browser, settings) -> None:
    admin = await admin_browser(new_browser, rdb)
    for i in range(settings.audit_page_max + 5):
        await app.ctx.users.create(f"c{i}@example.com", "x")
    r = await admin.get("/admin/audit?limit=100000")
    assert r.code == 200 and r.body.count(b'<tr id="ev-') == settings.audit_page_max


async def test_exports_stream_everything_with_filters(rdb, app, new_browser, browser) -> None:
    admin = await admin_browser(new_browser, rdb)
    for i in range(2500):  # more than one export chunk
        await app.ctx.users.create(f"e{i}@example.com", "x", ip="192.0.2.1", user_agent="=cmd|' /C calc'!A0")
    await browser.register("last@example.com")
    nd = await admin.get("/admin/audit.ndjson")
    assert nd.code == 200 and nd.headers["Content-Type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in nd.body.decode().splitlines()]
    assert len(rows) == 2500 + 4  # + the admin's register/login, last's register/login
    assert rows[0]["type"] == "login" and rows[0]["user"] == "last@example.com"
    assert len({r["id"] for r in rows}) == len(rows)
    assert set(rows[0]) == {"id", "type", "at", "user", "session", "ip", "user_agent", "reason", "actor"}
    logins = await admin.get("/admin/audit.ndjson?type=login")
    assert [json.loads(x)["type"] for x in logins.body.decode().splitlines()] == ["login", "login"]
    c = await admin.get("/admin/audit.csv?user=e7%40example.com")
    table = list(csv.reader(io.StringIO(c.body.decode())))
    assert table[0] == ["id", "type", "at", "user", "session", "ip", "user_agent", "reason", "actor", "count"]
    assert len(table) == 2 and table[1][3] == "e7@example.com" and table[1][9] == "1"
    assert table[1][6].startswith("'=")  # no formula injection into spreadsheets


async def test_admin_pages_are_admin_only(browser: Browser, new_browser) -> None:
    anonymous = new_browser()
    for path in ("/admin", "/admin/audit", "/admin/audit.ndjson", "/admin/audit.csv", "/admin/sessions"):
        r = await anonymous.get(path)
        assert r.code == 302 and r.headers["Location"].startswith("/login?next=")
    await browser.register("plain@example.com")
    for path in ("/admin", "/admin/audit", "/admin/audit.ndjson", "/admin/audit.csv", "/admin/sessions",
                 "/admin/users/1"):
        assert (await browser.get(path)).code == 403, path


async def test_html_in_user_agents_and_emails_is_escaped(rdb, new_browser, app) -> None:
    admin = await admin_browser(new_browser, rdb)
    evil = new_browser(XSS_UA)
    await evil.register("o'brien+<b>@example.com")  # invalid: shown back escaped in the form
    await evil.register("x.y@example.com")
    await evil.get("/account")
    for page in (await admin.get("/admin/audit"), await evil.get("/account"), await admin.get("/admin/sessions"),
                 await admin.get("/admin/users/2")):
        assert page.code == 200
        assert b"<script>alert" not in page.body and b"<img src=x" not in page.body
    audit = await admin.get("/admin/audit")
    assert b"&lt;script&gt;alert(&#34;ua&#34;)&lt;/script&gt;" in audit.body


async def test_user_and_session_timelines(browser: Browser, new_browser, rdb, clock) -> None:
    admin = await admin_browser(new_browser, rdb)
    await browser.register("t@example.com")
    clock.advance(125)
    await browser.logout()
    login = next(e for e in await read_events(rdb) if e.type == "login" and e.user == "t@example.com")
    page = await admin.get(f"/admin/sessions/{login.session}")
    assert page.code == 200
    assert b"Signed in" in page.body and b"Signed out" in page.body and b"2 min 5 s" in page.body
    user = await admin.get("/admin/users/2")
    assert user.code == 200 and b"t@example.com" in user.body and b"Registered" in user.body
    assert (await admin.get("/admin/sessions/AAAAAAAAAAAAAAAAAAAAAA")).code == 404
    assert (await admin.get("/admin/users/999")).code == 404


async def test_verify_passes_then_catches_planted_violations(browser: Browser, rdb, app) -> None:
    await browser.register("v@example.com")
    await browser.logout()
    await browser.login("v@example.com")
    audit: AuditLog = app.ctx.audit
    ok = await audit.verify()
    assert ok.problems == [] and ok.sessions == 2 and ok.open_sessions == 1 and ok.live_sessions == 1
    ended = next(e for e in await read_events(rdb) if e.type == "logout")
    # A second end for an ended session, written behind the site's back.
    await rdb.xadd(keys.AUDIT, {"v": "1", "t": "expired", "a": "", "u": "1", "e": "v@example.com",
                                "s": ended.session, "i": "", "g": "", "r": "idle", "c": ""})
    bad = await audit.verify()
    assert any("second end" in p for p in bad.problems)


async def test_retention_trims_old_events_and_indexes(rdb, app, clock) -> None:
    users = app.ctx.users
    await users.create("old@example.com", "x")
    await app.ctx.seals.seal_once()  # retention removes whole sealed batches (see test_seal.py)
    clock.advance(10 * 86400)
    await users.create("new@example.com", "x")
    await app.ctx.seals.seal_once()
    audit: AuditLog = app.ctx.audit
    cutoff = int((clock() - 5 * 86400) * 1000)
    assert await audit.trim_step(cutoff) == 1
    assert await audit.trim_step(cutoff) == 0
    assert [e.user for e in await read_events(rdb)] == ["new@example.com"]
    assert (await audit.page(Query(user="old@example.com"))).events == []
    assert await rdb.xlen(keys.AUDIT_TYPE + "register") == 1


async def test_fast_export_matches_the_pages(rdb, app, clock) -> None:
    """The unfiltered export reads the stream directly, chunk after chunk: same rows as the pages."""
    for i in range(40):
        await app.ctx.users.create(f"x{i}@example.com", "x", user_agent=f"Agent/{i % 3}")
        clock.advance(1)
    audit: AuditLog = app.ctx.audit
    start = (await read_events(rdb))[0].at
    for q in (Query(), Query(since=start + 10_000), Query(until=start + 20_000),
              Query(since=start + 5_000, until=start + 25_000), Query(before=(await read_events(rdb))[30].id)):
        exported = [row async for chunk in audit.export(q, chunk=7) for row in chunk]
        paged = [e.to_json() async for chunk in audit.iterate(q, chunk=7) for e in chunk]
        assert exported == paged and exported
    assert {r["user_agent"] for chunk in [c async for c in audit.export(Query(), 7)] for r in chunk} == {
        "Agent/0", "Agent/1", "Agent/2"}


async def test_filter_by_an_address_with_no_account(rdb, app, new_browser) -> None:
    """Failed logins for an address nobody registered are found by that address too."""
    admin = await admin_browser(new_browser, rdb)
    for _ in range(2):
        await new_browser().login("ghost@example.com", "no such account here")
    await new_browser().login("root@example.com", "a wrong password for root")
    audit: AuditLog = app.ctx.audit
    for q in (Query(user="ghost@example.com"), Query(user="ghost@example.com", type="login_failed")):
        page = await audit.page(q)
        assert [(e.type, e.user) for e in page.events] == [("login_failed", "ghost@example.com")] * 2
    assert (await audit.page(Query(user="ghost@example.com", type="login"))).events == []
    r = await admin.get("/admin/audit?user=ghost%40example.com")
    assert r.body.count(b'<tr id="ev-') == 2


async def test_export_reads_entries_written_in_another_field_order(rdb, app) -> None:
    await rdb.xadd(keys.AUDIT, {"t": "logout", "v": "1", "e": "odd@example.com", "s": "AAAAAAAAAAAAAAAA"},
                   id="1700000000000-0")
    rows = [row async for chunk in app.ctx.audit.export(Query()) for row in chunk]
    assert rows == [{"id": "1700000000000-0", "type": "logout", "at": "2023-11-14T22:13:20.000Z",
                     "user": "odd@example.com", "session": "AAAAAAAAAAAAAAAA", "ip": None, "user_agent": None,
                     "reason": None, "actor": None}]


def test_event_times_format_like_the_standard_library() -> None:
    import datetime as dt
    import random

    from sessionaudit import events
    rng = random.Random(11)
    for ms in [0, 86_399_999, 86_400_000, 951_782_400_000, 1_700_000_000_123, 253_402_300_799_999,
               *(rng.randrange(253_402_300_800_000) for _ in range(2000))]:
        moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).replace(microsecond=(ms % 1000) * 1000)
        assert events.iso_ms(ms) == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z", ms
