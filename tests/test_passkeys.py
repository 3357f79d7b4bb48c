"""Passkeys over HTTP with a software authenticator (tests/softkey.py): registration, sign-in, replay,
cloned authenticators, removal. The browser itself is tested in tests/browser/test_passkeys.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pyotp
import pytest
from softkey import SoftPasskey

from conftest import PASSWORD, UA_IPHONE, Browser, read_events, register_admin, test_settings
from sessionaudit import events, keys

pytestmark = pytest.mark.gen_test

ORIGIN = "https://sa.example"


@pytest.fixture
def settings() -> Any:
    return test_settings(public_url=ORIGIN + "/")


async def options(browser: Browser, path: str) -> dict[str, Any]:
    r = await browser.post(path)
    assert r.code == 200 and r.headers["Content-Type"].startswith("application/json"), r.body
    return json.loads(r.body)


async def add_passkey(browser: Browser, name: str = "", **kw: Any) -> SoftPasskey:
    key = SoftPasskey(ORIGIN, "sa.example", **kw)
    created = key.create(await options(browser, "/account/security/passkeys/options"))
    r = await browser.post("/account/security/passkeys", {"credential": created, "name": name})
    assert r.code == 303 and r.headers["Location"] == "/account/security?done=passkey-added", r.body
    return key


async def sign_in(browser: Browser, key: SoftPasskey, **kw: Any) -> Any:
    assertion = key.get(await options(browser, "/login/passkey/options"), **kw)
    return await browser.post("/login/passkey", {"credential": assertion, "next": "/account/security"})


async def test_add_a_passkey_then_sign_in_with_it_alone(browser: Browser, new_browser, rdb, clock) -> None:
    await browser.register("pat@example.com")
    opts = await options(browser, "/account/security/passkeys/options")
    assert opts["rp"] == {"name": "Session Audit", "id": "sa.example"}
    assert opts["user"]["name"] == "pat@example.com" and opts["attestation"] == "none"
    assert opts["authenticatorSelection"]["residentKey"] == "required"
    assert opts["authenticatorSelection"]["userVerification"] == "required"
    key = await add_passkey(browser, "My phone\x07  (work)", synced=True)
    added = (await read_events(rdb))[-1]
    assert added.type == events.PASSKEY_ADDED and added.user == "pat@example.com" and added.session
    page = (await browser.get("/account/security")).body.decode()
    assert "My phone (work)" in page and "synced, backed up" in page and "never" in page
    # The next registration excludes this credential, so one authenticator is not registered twice.
    again = await options(browser, "/account/security/passkeys/options")
    assert [c["id"] for c in again["excludeCredentials"]] == [key.id]

    person = new_browser()
    await person.get("/login")
    login_opts = await options(person, "/login/passkey/options")
    assert login_opts["rpId"] == "sa.example" and login_opts["userVerification"] == "required"
    assert not login_opts.get("allowCredentials")  # usernameless
    clock.advance(60)
    r = await person.post("/login/passkey", {"credential": key.get(login_opts), "next": "/account/security"})
    assert r.code == 303 and r.headers["Location"] == "/account/security"
    assert "sid" in person.cookies and "device" in person.cookies
    login = (await read_events(rdb))[-1]
    assert (login.type, login.reason, login.user) == (events.LOGIN, events.BY_PASSKEY, "pat@example.com")
    page = (await person.get("/account/security")).body.decode()
    assert "1 min ago" in page or "just now" in page  # last used


async def test_a_passkey_asks_no_second_factor(browser: Browser, new_browser, rdb, clock) -> None:
    await browser.register("tw@example.com")
    key = await add_passkey(browser)
    secret = re.search(r'data-totp-secret="(\w+)"', (await browser.post("/account/security/totp")).body.decode())[1]
    assert (await browser.post("/account/security/totp/confirm", {"code": pyotp.TOTP(secret).at(clock())})).code == 200
    other = new_browser()
    await other.get("/login")
    assert (await sign_in(other, key)).code == 303
    assert (await read_events(rdb))[-1].reason == events.BY_PASSKEY


async def test_an_answer_is_accepted_once(browser: Browser, new_browser, rdb) -> None:
    await browser.register("re@example.com")
    key = await add_passkey(browser)
    await browser.logout()
    assertion = key.get(await options(browser, "/login/passkey/options"))
    assert (await browser.post("/login/passkey", {"credential": assertion})).code == 303
    before = len(await read_events(rdb))
    replayer = new_browser()
    await replayer.get("/login")
    r = await replayer.post("/login/passkey", {"credential": assertion})
    assert r.code == 400 and "sid" not in replayer.cookies
    assert len(await read_events(rdb)) == before


async def test_challenges_expire(browser: Browser, rdb, clock) -> None:
    await browser.register("ex@example.com")
    key = SoftPasskey(ORIGIN, "sa.example")
    created = key.create(await options(browser, "/account/security/passkeys/options"))
    clock.advance(181)
    r = await browser.post("/account/security/passkeys", {"credential": created})
    assert r.code == 400 and "too long" in r.body.decode()
    assert not await rdb.keys(keys.PASSKEY + "*")
    key = await add_passkey(browser)
    await browser.logout()
    assertion = key.get(await options(browser, "/login/passkey/options"))
    clock.advance(181)
    assert (await browser.post("/login/passkey", {"credential": assertion})).code == 400


async def test_a_registration_is_bound_to_the_session_that_asked(browser: Browser, new_browser, rdb) -> None:
    await browser.register("bd@example.com")
    other = new_browser()
    await other.login("bd@example.com")
    key = SoftPasskey(ORIGIN, "sa.example")
    created = key.create(await options(browser, "/account/security/passkeys/options"))
    assert (await other.post("/account/security/passkeys", {"credential": created})).code == 400
    assert not await rdb.keys(keys.PASSKEY + "*")


@pytest.mark.parametrize("how", ["phishing origin", "tampered", "not verified"])
async def test_a_bad_answer_is_a_failed_login(browser: Browser, new_browser, rdb, how: str) -> None:
    await browser.register("bad@example.com")
    key = await add_passkey(browser)
    person = new_browser()
    await person.get("/login")
    kw = {"phishing origin": {"origin": "https://sa.example.evil"}, "tampered": {"tamper": True},
          "not verified": {"verified": False}}[how]
    r = await sign_in(person, key, **kw)
    assert r.code == 401 and "sid" not in person.cookies
    failed = (await read_events(rdb))[-1]
    assert (failed.type, failed.reason, failed.user) == (events.LOGIN_FAILED, events.BAD_CREDENTIALS,
                                                         "bad@example.com")


async def test_a_sign_count_that_goes_back_is_refused(browser: Browser, new_browser, rdb) -> None:
    """An authenticator with a counter: a clone (or a replay) shows a count not above the last one."""
    await browser.register("cl@example.com")
    key = await add_passkey(browser)
    person = new_browser()
    await person.get("/login")
    assert (await sign_in(person, key, counter=True)).code == 303
    assert (await sign_in(person, key, counter=True)).code == 303
    key.sign_count = 1  # the clone's counter lags
    r = await sign_in(person, key)
    assert r.code == 401
    assert (await read_events(rdb))[-1].type == events.LOGIN_FAILED


@pytest.mark.parametrize("credential", ["", "null", "{}", "[1]", '{"id": "AA", "rawId": "AA", "response": {}}',
                                        "x" * 60000, '{"id":"\u0000"}'])
async def test_malformed_answers_are_400(browser: Browser, rdb, credential: str) -> None:
    await browser.register("mf@example.com")
    before = len(await read_events(rdb))
    assert (await browser.post("/account/security/passkeys", {"credential": credential})).code == 400
    await browser.logout()
    assert (await browser.post("/login/passkey", {"credential": credential})).code == 400
    assert len(await read_events(rdb)) == before + 1  # the logout


async def test_an_unknown_passkey_is_400_and_records_nothing(browser: Browser, rdb) -> None:
    await browser.get("/login")
    key = SoftPasskey(ORIGIN, "sa.example")
    key.user_handle = b"x" * 16
    r = await sign_in(browser, key)
    assert r.code == 400 and "not registered here" in r.body.decode()
    assert await read_events(rdb) == []


async def test_rename_and_remove(browser: Browser, new_browser, rdb) -> None:
    await browser.register("rm@example.com")
    first = await add_passkey(browser, "Laptop")
    second = await add_passkey(browser, "Phone")
    page = (await browser.get("/account/security")).body.decode()
    refs = re.findall(r"/account/security/passkeys/([\w-]{22})/remove", page)
    assert len(refs) == 2
    assert (await browser.post(f"/account/security/passkeys/{refs[0]}/rename", {"name": "Old laptop"})).code == 303
    assert "Old laptop" in (await browser.get("/account/security")).body.decode()
    # Someone else's passkey (or none) is not found.
    stranger = new_browser()
    await stranger.register("st@example.com")
    assert (await stranger.post(f"/account/security/passkeys/{refs[0]}/rename", {"name": "mine"})).code == 404
    assert (await stranger.post(f"/account/security/passkeys/{refs[0]}/remove")).code == 404

    assert (await browser.post(f"/account/security/passkeys/{refs[0]}/remove")).code == 303
    removed = (await read_events(rdb))[-1]
    assert removed.type == events.PASSKEY_REMOVED and removed.user == "rm@example.com"
    # The last factor needs the password.
    r = await browser.post(f"/account/security/passkeys/{refs[1]}/remove")
    assert r.code == 400 and "enter your password" in r.body.decode()
    r = await browser.post(f"/account/security/passkeys/{refs[1]}/remove", {"password": "not the password"})
    assert r.code == 400 and (await read_events(rdb))[-1].reason == events.BAD_CREDENTIALS
    r = await browser.post(f"/account/security/passkeys/{refs[1]}/remove", {"password": PASSWORD})
    assert r.code == 303 and (await read_events(rdb))[-1].type == events.PASSKEY_REMOVED
    # A removed passkey signs no one in.
    await browser.logout()
    for key in (first, second):
        assert (await sign_in(browser, key)).code == 400


async def test_an_admin_reset_removes_passkeys(browser: Browser, new_browser, rdb) -> None:
    await browser.register("ar@example.com")
    key = await add_passkey(browser, "Phone")
    admin = new_browser()
    await register_admin(admin, rdb, "root@example.com")
    page = (await admin.get("/admin/users/1")).body.decode()
    assert "Phone: added" in page
    assert (await admin.post("/admin/users/1/mfa/reset")).code == 303
    assert (await read_events(rdb))[-1].reason == events.BY_ADMIN
    assert not await rdb.keys(keys.PASSKEY + "*")
    await browser.logout()
    assert (await sign_in(browser, key)).code == 400


async def test_no_passkeys_when_the_site_is_reached_by_an_address(http_client, base_url, rdb, clock) -> None:
    from conftest import serving
    from sessionaudit.app import make_app
    async with serving(make_app(test_settings(), rdb, clock)) as base:
        b = Browser(http_client, base)
        page = (await b.get("/login")).body.decode()
        assert "passkey-login-form" not in page and "passkeys.js" not in page
        r = await b.post("/login/passkey/options")
        assert r.code == 400 and "host name" in json.loads(r.body)["error"]


async def test_anonymous_floods_write_nothing(browser: Browser, rdb) -> None:
    """Asking for sign-in options, and answering with passkeys the site does not know, writes nothing."""
    await browser.register("fl@example.com")
    await add_passkey(browser)
    await browser.logout()
    before = {k: await rdb.type(k) for k in await rdb.keys("*")}
    events_before = await rdb.xlen(keys.AUDIT)
    stranger = SoftPasskey(ORIGIN, "sa.example")
    stranger.user_handle = b"s" * 16
    for _ in range(30):
        opts = await options(browser, "/login/passkey/options")
        assert (await browser.post("/login/passkey", {"credential": stranger.get(opts)})).code == 400
    assert {k: await rdb.type(k) for k in await rdb.keys("*")} == before
    assert await rdb.xlen(keys.AUDIT) == events_before


# -- a cookie alone cannot add a factor ------------------------------------------------------------------

async def test_a_stolen_cookie_cannot_add_a_factor_without_the_password(browser: Browser, new_browser, rdb,
                                                                        clock) -> None:
    """A review added a passkey (and turned TOTP on) from a copied session cookie in another browser:
    a way in that outlived the owner's password change and locked the owner out. A session that moved
    since its sign-in, or began more than 10 minutes ago, must give the password first."""
    await browser.register("owner@example.com")
    thief = new_browser(UA_IPHONE)
    thief.cookies = dict(browser.cookies)
    assert (await thief.get("/account")).code == 200  # the cookie works (binding is off): a move is recorded

    r = await thief.post("/account/security/passkeys/options")
    assert r.code == 400 and json.loads(r.body)["error"] == "To add a second factor, enter your password first."
    r = await thief.post("/account/security/totp")
    body = r.body.decode()
    assert r.code == 400 and "enter your password first" in body and "data-totp-secret" not in body
    r = await thief.post("/account/security/totp", {"password": "a guess of twelve+ chars"})
    assert r.code == 400 and "data-totp-secret" not in r.body.decode()
    failed = [e for e in await read_events(rdb) if e.type == events.LOGIN_FAILED]
    assert [(e.user, e.reason) for e in failed] == [("owner@example.com", events.BAD_CREDENTIALS)]  # and throttled
    assert not await rdb.keys("sa:pks:*")

    # With the password, the same session may (and the page asks for it in the form).
    page = (await thief.get("/account/security")).body.decode()
    assert 'id="totp-password"' in page
    assert (await thief.post("/account/security/passkeys/options", {"password": PASSWORD})).code == 200
    r = await thief.post("/account/security/totp", {"password": PASSWORD})
    assert r.code == 200 and "data-totp-secret" in r.body.decode()


async def test_an_old_session_gives_the_password_before_adding_a_factor(browser: Browser, rdb, clock) -> None:
    await browser.register("aged@example.com")
    page = (await browser.get("/account/security")).body.decode()
    assert 'name="password"' not in page.split('action="/account/security/totp"')[1].split("</form>")[0]
    await add_passkey(browser, "fresh")  # just signed in, here: no password asked
    for _ in range(11):  # eleven minutes of use: the session stays alive
        clock.advance(60)
        assert (await browser.get("/account")).code == 200
    r = await browser.post("/account/security/passkeys/options")
    assert r.code == 400
    key = SoftPasskey(ORIGIN, "sa.example")
    created = key.create(json.loads((await browser.post("/account/security/passkeys/options",
                                                        {"password": PASSWORD})).body))
    r = await browser.post("/account/security/passkeys", {"credential": created, "name": "later"})
    assert r.code == 400 and not (await browser.get("/account/security")).body.decode().count("later")
    r = await browser.post("/account/security/passkeys", {"credential": created, "name": "later",
                                                          "password": PASSWORD})
    assert r.code == 303 and r.headers["Location"] == "/account/security?done=passkey-added"


async def test_a_step_begun_while_fresh_is_not_finished_after_a_move(browser: Browser, new_browser, rdb,
                                                                    clock) -> None:
    """A re-check: a passkey challenge or a TOTP setup obtained while the session was fresh, then used
    from the moved session (its wrong-code page even showed the secret). Every step passes the gate."""
    await browser.register("steps@example.com")
    key = SoftPasskey(ORIGIN, "sa.example")
    created = key.create(await options(browser, "/account/security/passkeys/options"))
    secret_page = (await browser.post("/account/security/totp")).body.decode()
    secret = re.search(r'data-totp-secret="([A-Z2-7]+)"', secret_page).group(1)
    thief = new_browser(UA_IPHONE)
    thief.cookies = dict(browser.cookies)
    r = await thief.post("/account/security/passkeys", {"credential": created, "name": "thief"})
    assert r.code == 400 and not await rdb.keys("sa:pks:*")
    r = await thief.post("/account/security/totp/confirm", {"code": "000000"})
    assert r.code == 400 and secret not in r.body.decode()
    r = await thief.post("/account/security/totp/confirm", {"code": pyotp.TOTP(secret).at(clock())})
    assert r.code == 400 and "data-recovery-code" not in r.body.decode()
    assert not [e for e in await read_events(rdb) if e.type in (events.MFA_ENABLED, events.PASSKEY_ADDED)]
    options_reply = await thief.post("/account/security/passkeys/options")
    assert json.loads(options_reply.body)["reauth"] is True  # the script then reloads the page, which asks
