"""Own sessions, password change, admin session management, disabling, and login throttling."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import PASSWORD, UA_FIREFOX, UA_IPHONE, Browser, read_events, register_admin, serving
from sessionaudit import keys
from sessionaudit.app import make_app

pytestmark = pytest.mark.gen_test

NEW_PASSWORD = "a completely different passphrase"


def session_refs(body: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb"/sessions/([A-Za-z0-9_-]{16})/revoke", body)]


async def test_two_browsers_see_and_end_each_other(browser: Browser, new_browser, rdb) -> None:
    await browser.register("two@example.com")
    phone = new_browser(UA_IPHONE)
    await phone.login("two@example.com")
    page = await browser.get("/account")
    assert b"Mobile Safari 17 on iOS 17" in page.body and b"Firefox 120 on Linux" in page.body
    assert b"This device" in page.body
    refs = session_refs(page.body)
    assert len(refs) == 2
    own = next(e.session for e in reversed(await read_events(rdb)) if e.type == "login" and "Firefox" in e.user_agent)
    other = next(r for r in refs if r != own)
    r = await browser.post(f"/account/sessions/{other}/revoke")
    assert r.code == 303
    assert (await phone.get("/account")).code == 302  # the ended browser is anonymous at once
    assert (await browser.get("/account")).code == 200
    revoked = [e for e in await read_events(rdb) if e.type == "revoked"]
    assert [(e.session, e.reason, e.actor) for e in revoked] == [(other, "user", "two@example.com")]


async def test_sessions_are_named_by_the_browser_they_began_in(browser: Browser, new_browser, rdb) -> None:
    await browser.register("named@example.com")
    phone = new_browser(UA_IPHONE)
    await phone.login("named@example.com")
    browser.user_agent = UA_FIREFOX.replace("120.0", "121.0")  # the same browser, updated since sign-in
    for who in (browser, phone):
        page = (await who.get("/account")).body
        assert b"Firefox 120 on Linux" in page and b"Mobile Safari 17 on iOS 17" in page
        assert b"Firefox 121" not in page


async def test_cannot_end_someone_elses_session(browser: Browser, new_browser, rdb) -> None:
    await browser.register("mine@example.com")
    victim = new_browser()
    await victim.register("victim@example.com")
    victim_ref = session_refs((await victim.get("/account")).body)[0]
    r = await browser.post(f"/account/sessions/{victim_ref}/revoke")
    assert r.code == 404
    assert (await victim.get("/account")).code == 200


async def test_sign_out_all_other_sessions(browser: Browser, new_browser, rdb) -> None:
    await browser.register("all@example.com")
    others = [new_browser() for _ in range(3)]
    for b in others:
        await b.login("all@example.com")
    assert (await browser.post("/account/sessions/revoke-others")).code == 303
    for b in others:
        assert (await b.get("/account")).code == 302
    assert (await browser.get("/account")).code == 200
    assert len([e for e in await read_events(rdb) if e.type == "revoked" and e.reason == "user"]) == 3


async def test_ending_this_session_logs_this_browser_out(browser: Browser) -> None:
    await browser.register("self@example.com")
    ref = session_refs((await browser.get("/account")).body)[0]
    r = await browser.post(f"/account/sessions/{ref}/revoke")
    assert r.code == 303 and r.headers["Location"] == "/"
    assert (await browser.get("/account")).code == 302


async def test_password_change_ends_the_others_and_keeps_this_browser(browser: Browser, new_browser, rdb) -> None:
    await browser.register("pw@example.com")
    other = new_browser()
    await other.login("pw@example.com")
    old_cookie = browser.cookies["sid"]
    wrong = await browser.post("/account/password", {"current_password": "not it at all", "password": NEW_PASSWORD,
                                                     "password_confirm": NEW_PASSWORD})
    assert wrong.code == 400 and b"current password is not right" in wrong.body
    r = await browser.post("/account/password", {"current_password": PASSWORD, "password": NEW_PASSWORD,
                                                 "password_confirm": NEW_PASSWORD})
    assert r.code == 303
    assert browser.cookies["sid"] != old_cookie  # a new session id for this browser
    assert (await browser.get("/account")).code == 200
    assert (await other.get("/account")).code == 302
    stale = Browser(browser.client, browser.base_url)
    stale.cookies["sid"] = old_cookie
    assert (await stale.get("/account")).code == 302
    evs = await read_events(rdb)
    revoked = [e for e in evs if e.type == "revoked"]
    assert {e.reason for e in revoked} == {"password_change"} and len(revoked) == 2
    # The change itself is recorded first, naming the session that made it, in the same script.
    changed = [e for e in evs if e.type == "password_changed"]
    assert [e.type for e in evs[:3]] == ["register", "login", "login"]
    this_ref = evs[1].session  # the browser that changed it (registered, so signed in first)
    assert [(e.user, e.reason, e.session, e.actor) for e in changed] == [("pw@example.com", "user", this_ref, None)]
    assert evs.index(changed[0]) < min(evs.index(e) for e in revoked)
    assert (await new_browser().login("pw@example.com")).code == 401
    assert (await new_browser().login("pw@example.com", NEW_PASSWORD)).code == 303


async def test_admin_ends_one_and_all_sessions_of_a_user(browser: Browser, new_browser, rdb) -> None:
    admin = new_browser()
    await register_admin(admin, rdb, "boss@example.com")
    await browser.register("emp@example.com")
    phone = new_browser(UA_IPHONE)
    await phone.login("emp@example.com")
    listing = await admin.get("/admin/sessions")
    assert listing.code == 200 and b"emp@example.com" in listing.body and b"boss@example.com" in listing.body
    filtered = await admin.get("/admin/sessions?user=emp%40example.com")
    refs = session_refs(filtered.body)
    assert len(refs) == 2
    assert (await admin.post(f"/admin/sessions/{refs[0]}/revoke")).code == 303
    survivors = session_refs((await admin.get("/admin/sessions?user=emp%40example.com")).body)
    assert survivors == [refs[1]]
    uid = (await rdb.hget(keys.EMAILS, "emp@example.com")).decode()
    assert (await admin.post(f"/admin/users/{uid}/revoke")).code == 303
    assert (await browser.get("/account")).code == 302 and (await phone.get("/account")).code == 302
    revoked = [e for e in await read_events(rdb) if e.type == "revoked"]
    assert [(e.reason, e.actor) for e in revoked] == [("admin", "boss@example.com")] * 2
    assert (await admin.get("/account")).code == 200
    # Admin actions need an admin: a plain user gets 403 and changes nothing.
    await browser.login("emp@example.com")
    boss_ref = session_refs((await admin.get("/admin/sessions?user=boss%40example.com")).body)[0]
    assert (await browser.post(f"/admin/sessions/{boss_ref}/revoke")).code == 403
    assert (await admin.get("/account")).code == 200


async def test_disabling_an_account_ends_its_sessions_and_blocks_login(browser: Browser, new_browser, rdb) -> None:
    admin = new_browser()
    await register_admin(admin, rdb, "boss2@example.com")
    await browser.register("gone@example.com")
    uid = (await rdb.hget(keys.EMAILS, "gone@example.com")).decode()
    assert (await admin.post(f"/admin/users/{uid}/disable")).code == 303
    assert (await browser.get("/account")).code == 302
    disabled = await new_browser().login("gone@example.com")
    unknown = await new_browser().login("nobody@example.com")
    assert disabled.code == unknown.code == 401
    assert disabled.body.split(b'role="alert"')[1][:80] == unknown.body.split(b'role="alert"')[1][:80]
    assert (await admin.post(f"/admin/users/{uid}/enable")).code == 303
    assert (await new_browser().login("gone@example.com")).code == 303


async def test_admin_can_grant_and_remove_admin_rights_but_not_their_own(new_browser, rdb) -> None:
    admin = new_browser()
    await register_admin(admin, rdb, "boss3@example.com")
    user = new_browser()
    await user.register("helper@example.com")
    assert (await user.get("/admin/audit")).code == 403
    assert (await admin.post("/admin/users/2/admin")).code == 303
    assert (await user.get("/admin/audit")).code == 200
    assert (await admin.post("/admin/users/2/unadmin")).code == 303
    assert (await user.get("/admin/audit")).code == 403
    assert (await admin.post("/admin/users/1/unadmin")).code == 400


async def test_throttle_429_with_growing_retry_after_then_the_user_gets_in(browser: Browser, new_browser, rdb,
                                                                           clock, settings, app) -> None:
    await browser.register("target@example.com")
    attacker = new_browser()
    threshold = settings.login_account_threshold
    for _ in range(threshold):
        assert (await attacker.login("target@example.com", "guess guess guess")).code == 401
    waits = []
    for _ in range(3):
        r = await attacker.login("target@example.com", "guess guess guess")
        assert r.code == 429
        waits.append(int(r.headers["Retry-After"]))
        # Even the right password is refused until the wait has passed.
        right = await new_browser().login("target@example.com")
        assert right.code == 429 and "Retry-After" in right.headers
        clock.advance(waits[-1])
        assert (await attacker.login("target@example.com", "guess guess guess")).code == 401
    assert waits == sorted(waits) and waits[0] < waits[-1]
    assert max(waits) <= settings.login_backoff_max
    # Other accounts, and other addresses, are unaffected.
    other = new_browser()
    await other.register("bystander@example.com")
    await other.logout()
    assert (await other.login("bystander@example.com")).code == 303
    # The real user, after the backoff, gets in; a success resets the count.
    clock.advance(settings.login_backoff_max)
    assert (await new_browser().login("target@example.com")).code == 303
    assert (await new_browser().login("target@example.com", "one more wrong guess")).code == 401
    assert (await new_browser().login("target@example.com")).code == 303
    clock.advance(settings.login_backoff_max)
    await app.ctx.throttle.flush_due()  # the sweeper's part: the last window's summary
    evs = await read_events(rdb)
    assert len([e for e in evs if e.type == "locked_out"]) == 1
    # Each throttled stretch: its first refused attempt, then a summary of the others in its window.
    throttled = [e for e in evs if e.type == "login_failed" and e.reason == "throttled"]
    assert [e.count for e in throttled] == [1, 1] * 3 and sum(e.count for e in throttled) == 6


async def test_throttle_is_the_same_for_unknown_emails(new_browser, settings) -> None:
    """No enumeration: an unknown account is throttled exactly like a real one."""
    real = new_browser()
    await real.register("real@example.com")
    codes = {}
    for email in ("real@example.com", "ghost@example.com"):
        b = new_browser()
        seq = []
        for _ in range(settings.login_account_threshold + 1):
            seq.append((await b.login(email, "wrong wrong wrong")).code)
        codes[email] = seq
    assert codes["real@example.com"] == codes["ghost@example.com"] == [401] * settings.login_account_threshold + [429]


async def test_address_throttle_sits_above_account_throttle(http_client, rdb, clock, settings) -> None:
    """Per address with --xheaders: one address guessing many accounts is stopped; another address is not."""
    settings = dataclasses.replace(settings, xheaders=True, login_address_threshold=6)
    app = make_app(settings, rdb, clock)
    async with serving(app, xheaders=True) as base:
        def at(ip: str) -> Browser:
            b = Browser(http_client, base)
            original = b.fetch

            async def fetch(path, method="GET", body=None, headers=None, **kw):
                return await original(path, method, body, {**(headers or {}), "X-Forwarded-For": ip}, **kw)

            b.fetch = fetch  # type: ignore[method-assign]
            return b

        user = at("198.51.100.7")
        await user.register("nat@example.com")
        await user.logout()
        codes = [(await at("203.0.113.9").login(f"acct{i}@example.com", "wrong wrong wrong")).code for i in range(7)]
        assert codes == [401] * 6 + [429]
        assert (await at("198.51.100.7").login("nat@example.com")).code == 303
        failed = [e for e in await read_events(rdb) if e.type == "login_failed"]
        assert {e.ip for e in failed} == {"203.0.113.9"}


async def test_forwarded_for_is_ignored_without_xheaders(browser: Browser, rdb) -> None:
    await browser.get("/login")
    await browser.post("/register", {"email": "fwd@example.com", "password": PASSWORD, "password_confirm": PASSWORD},
                       headers={"X-Forwarded-For": "203.0.113.50", "X-Real-Ip": "203.0.113.51"})
    assert {e.ip for e in await read_events(rdb)} == {"127.0.0.1"}
