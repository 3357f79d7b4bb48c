"""Sessions that move: a session used from another address or browser shows in the trail, and can be stopped."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import UA_FIREFOX, UA_IPHONE, Browser, read_events, register_admin, serving
from process import run
from sessionaudit.app import make_app

pytestmark = pytest.mark.gen_test(timeout=60)

UA_FIREFOX_NEXT = UA_FIREFOX.replace("120.0", "121.0")
UA_CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
             "Safari/537.36")


class Proxied(Browser):
    """A browser behind the proxy (--xheaders): its address is what X-Forwarded-For says."""

    def __init__(self, *args, ip: str = "198.51.100.1", **kwargs):
        super().__init__(*args, **kwargs)
        self.ip = ip

    async def fetch(self, path, method="GET", body=None, headers=None, **kw):
        return await super().fetch(path, method, body, {"X-Forwarded-For": self.ip, **(headers or {})}, **kw)


@pytest.fixture
def proxied_site(http_client, rdb, clock, settings):
    """Start a site behind a (pretend) proxy; returns an async context manager yielding (app, base URL)."""
    def start(**overrides):
        app = make_app(dataclasses.replace(settings, xheaders=True, **overrides), rdb, clock)
        return app, serving(app, xheaders=True)
    return start


async def moves(rdb) -> list:
    return [e for e in await read_events(rdb) if e.type == "session_changed"]


async def test_each_new_pair_is_recorded_once(proxied_site, http_client, rdb) -> None:
    _, server = proxied_site()
    async with server as base:
        b = Proxied(http_client, base)
        await b.register("mover@example.com")
        for _ in range(3):
            assert (await b.get("/account")).code == 200
        assert await moves(rdb) == []  # the same address and browser as at sign-in
        b.ip = "203.0.113.7"  # a new network
        for _ in range(3):
            assert (await b.get("/account")).code == 200
        b.user_agent = UA_CHROME  # another browser
        await b.get("/account")
        b.ip, b.user_agent = "192.0.2.99", UA_IPHONE  # both at once
        await b.get("/")
        b.ip, b.user_agent = "198.51.100.1", UA_FIREFOX  # back where it began: a move too
        await b.get("/account")
        got = await moves(rdb)
        assert [(e.reason, e.ip) for e in got] == [("address", "203.0.113.7"), ("browser", "203.0.113.7"),
                                                   ("address,browser", "192.0.2.99"), ("address,browser",
                                                                                        "198.51.100.1")]
        assert got[1].user_agent == UA_CHROME and got[2].user_agent == UA_IPHONE
        login = next(e for e in await read_events(rdb) if e.type == "login")
        assert all(e.session == login.session and e.user == "mover@example.com" and e.uid == login.uid
                   for e in got)


async def test_a_browser_update_and_a_new_ipv6_host_are_not_moves(proxied_site, http_client, rdb) -> None:
    _, server = proxied_site(session_binding="browser")
    async with server as base:
        b = Proxied(http_client, base, ip="2001:db8:1:2:aaaa::1")
        await b.register("stable@example.com")
        b.user_agent = UA_FIREFOX_NEXT  # Firefox 120 -> 121: a version, not a browser
        b.ip = "2001:db8:1:2:bbbb::7"  # privacy extensions: the same /64
        assert (await b.get("/account")).code == 200
        assert await moves(rdb) == []
        b.ip = "2001:db8:9:9::1"  # another network
        assert (await b.get("/account")).code == 200
        assert [e.reason for e in await moves(rdb)] == ["address"]


async def test_nothing_for_anonymous_or_ended_sessions(proxied_site, http_client, rdb) -> None:
    _, server = proxied_site()
    async with server as base:
        anonymous = Proxied(http_client, base)
        for ip in ("203.0.113.1", "203.0.113.2"):
            anonymous.ip = ip
            await anonymous.get("/")
            await anonymous.get("/login")
        b = Proxied(http_client, base)
        await b.register("ended@example.com")
        stolen = dict(b.cookies)
        await b.logout()
        thief = Proxied(http_client, base, ip="192.0.2.66", user_agent=UA_CHROME)
        thief.cookies = stolen
        assert (await thief.get("/account")).code == 302
        assert await moves(rdb) == []


async def test_forged_forwarded_for_without_xheaders_is_ignored(browser: Browser, rdb) -> None:
    await browser.register("plain@example.com")
    for ip in ("203.0.113.1", "203.0.113.2"):
        assert (await browser.get("/account", headers={"X-Forwarded-For": ip})).code == 200
    assert await moves(rdb) == []


@pytest.mark.parametrize("binding,change,ends", [
    ("browser", "browser", True), ("browser", "address", False),
    ("address", "address", True), ("address", "browser", False),
])
async def test_binding_ends_the_session_once(proxied_site, http_client, rdb, binding, change, ends) -> None:
    _, server = proxied_site(session_binding=binding)
    async with server as base:
        b = Proxied(http_client, base)
        await b.register("bound@example.com")
        thief = Proxied(http_client, base, ip="192.0.2.66" if change == "address" else b.ip,
                        user_agent=UA_CHROME if change == "browser" else b.user_agent)
        thief.cookies = dict(b.cookies)
        r = await thief.get("/account")
        evs = await read_events(rdb)
        if ends:
            assert r.code == 302 and r.headers["Location"].startswith("/login")  # served as anonymous
            [revoked] = [e for e in evs if e.type == "revoked"]
            assert (revoked.reason, revoked.actor) == ("binding", None)
            assert revoked.ip == thief.ip and revoked.user_agent == thief.user_agent
            assert (await b.get("/account")).code == 302  # the session is over for its owner too
            assert (await thief.get("/account")).code == 302
            assert len([e for e in await read_events(rdb) if e.type == "revoked"]) == 1
            assert not [e for e in evs if e.type == "session_changed"]
        else:
            assert r.code == 200
            assert [e.reason for e in evs if e.type == "session_changed"] == [change]
            assert not [e for e in evs if e.type == "revoked"]


def test_a_bad_binding_stops_the_start() -> None:
    result = run("--session-binding=ip", "--port=1")
    assert result.returncode == 2
    assert "--session-binding must be off, browser or address" in result.stderr


async def test_a_session_that_keeps_moving_is_summarised(proxied_site, http_client, rdb, clock) -> None:
    """A client alternating between two addresses: ten moves a minute are recorded one by one (and one
    more that opens the summary); the rest are counted and recorded as one event when the minute is over."""
    app, server = proxied_site()
    async with server as base:
        b = Proxied(http_client, base)
        await b.register("flapper@example.com")
        events_before = len(await read_events(rdb))
        for i in range(200):
            b.ip = "203.0.113.1" if i % 2 == 0 else "203.0.113.2"
            assert (await b.get("/account")).code == 200
        assert len(await read_events(rdb)) - events_before == 11
        clock.advance(61)
        await app.ctx.throttle.flush_due()
        got = await moves(rdb)
        assert len(got) == 12 and sum(e.count for e in got) == 200
        assert got[-1].count == 189 and got[-1].session == got[0].session and got[-1].reason == "address"


async def test_a_session_that_keeps_moving_all_day_is_bounded_per_day(proxied_site, http_client, rdb, clock) -> None:
    """Ten moves a minute one by one, kept up all day, would be 14,400 events of one session: a session
    records 300 moves a day one by one, then each minute one as it came and a summary."""
    app, server = proxied_site()
    clock.next_day()  # the 31 minutes below within one day
    async with server as base:
        b = Proxied(http_client, base)
        await b.register("flapper@example.com")
        written, n = [], 0
        for _ in range(31):
            before = len(await moves(rdb))
            for _ in range(12):
                b.ip = "203.0.113.1" if n % 2 == 0 else "203.0.113.2"
                n += 1
                assert (await b.get("/account")).code == 200
            clock.advance(60)
            await app.ctx.throttle.flush_due()
            written.append(len(await moves(rdb)) - before)
        assert written == [12] * 30 + [2]  # ten, one as it came, a summary of one; then as it came, and 11
        assert sum(e.count for e in await moves(rdb)) == n


async def test_huge_and_odd_user_agents_are_bounded_and_escaped(proxied_site, http_client, rdb) -> None:
    _, server = proxied_site()
    async with server as base:
        b = Proxied(http_client, base)
        await register_admin(b, rdb, "odd@example.com")
        b.user_agent = "<script>alert(1)</script>" + "A" * 10_000
        assert (await b.get("/account")).code == 200
        [move] = await moves(rdb)
        assert len(move.user_agent) == 512
        for path in ("/account", f"/admin/sessions/{move.session}", "/admin/audit"):
            page = (await b.get(path)).body.decode()
            assert "<script>alert(1)" not in page, path
            if path != "/account":  # which shows where the session began
                assert "&lt;script&gt;alert(1)" in page, path


async def test_people_and_admins_see_the_moves(proxied_site, http_client, rdb) -> None:
    _, server = proxied_site()
    async with server as base:
        owner = Proxied(http_client, base)
        await owner.register("seen@example.com")
        laptop = Proxied(http_client, base, ip="198.51.100.1")
        await laptop.login("seen@example.com")
        laptop.ip = "203.0.113.50"
        await laptop.get("/account")
        account = (await owner.get("/account")).body.decode()
        assert account.count("Used from a new address since sign-in") == 1
        admin = Proxied(http_client, base)
        await register_admin(admin, rdb, "boss@example.com")
        dashboard = (await admin.get("/admin")).body.decode()
        assert re.search(r'id="stat-moved">1<', dashboard)
        [move] = await moves(rdb)
        assert f'href="/admin/sessions/{move.session}"' in dashboard
        session_page = (await admin.get(f"/admin/sessions/{move.session}")).body.decode()
        assert "Moves" in session_page and "198.51.100.1" in session_page and "203.0.113.50" in session_page
        trail = (await admin.get("/admin/audit?type=session_changed")).body.decode()
        assert trail.count('<tr id="ev-') == 1 and "Session moved" in trail
