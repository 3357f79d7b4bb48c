"""TOTP and recovery codes over HTTP, with pyotp computing the codes as an authenticator app would."""

from __future__ import annotations

import html
import re
from typing import Any

import pyotp
import pytest
import tornado.web

from conftest import PASSWORD, Browser, make_admin, read_events, register_admin, serving
from sessionaudit import events, keys
from sessionaudit.app import make_app

pytestmark = pytest.mark.gen_test

SECRET = re.compile(r'data-totp-secret="([A-Z2-7]+)"')
RECOVERY = re.compile(r'data-recovery-code="([0-9a-z-]+)"')


def code_at(secret: str, seconds: float) -> str:
    return pyotp.TOTP(secret).at(seconds)


async def start_setup(browser: Browser) -> str:
    r = await browser.post("/account/security/totp")
    assert r.code == 200, r.body
    body = r.body.decode()
    assert "<svg" in body and "otpauth" not in body  # the URI only as a QR code, drawn here
    return SECRET.search(body).group(1)


async def enable(browser: Browser, clock: Any, email: str) -> tuple[str, list[str]]:
    """Register ``email`` and turn TOTP on; returns the secret and the recovery codes."""
    await browser.register(email)
    secret = await start_setup(browser)
    r = await browser.post("/account/security/totp/confirm", {"code": code_at(secret, clock())})
    assert r.code == 200, r.body
    codes = RECOVERY.findall(r.body.decode())
    return secret, codes


async def password_step(browser: Browser, email: str, **extra: str) -> Any:
    await browser.logout()
    r = await browser.login(email, **extra)
    assert r.code == 303 and r.headers["Location"] == "/login/verify", (r.code, r.body)
    return r


async def logins(rdb: Any) -> list[events.Event]:
    return [e for e in await read_events(rdb) if e.type == events.LOGIN]


async def redis_dump(rdb: Any) -> bytes:
    """Every key and value in Redis, as bytes (to look for secrets in the clear)."""
    out = []
    for key in await rdb.keys("*"):
        kind = (await rdb.type(key)).decode()
        out.append(key)
        if kind == "string":
            out.append(await rdb.get(key))
        elif kind == "hash":
            out += [x for kv in (await rdb.hgetall(key)).items() for x in kv]
        elif kind == "set":
            out += list(await rdb.smembers(key))
        elif kind == "stream":
            out += [x for _, f in await rdb.xrange(key) for kv in f.items() for x in kv]
    return b"\n".join(out)


async def test_setup_shows_the_secret_and_a_code_turns_it_on(browser: Browser, rdb, clock) -> None:
    await browser.register("ann@example.com")
    page = (await browser.get("/account/security")).body.decode()
    assert "Off" in page and "Set up an authenticator app" in page
    secret = await start_setup(browser)
    assert len(secret) == 32
    assert secret.encode() not in await redis_dump(rdb)  # sealed while set up, too
    # Starting again while a setup is under way shows the same secret (the app may have it already).
    assert await start_setup(browser) == secret

    r = await browser.post("/account/security/totp/confirm", {"code": code_at(secret, clock()) + "0"})
    assert r.code == 400 and SECRET.search(r.body.decode()).group(1) == secret
    assert not [e for e in await read_events(rdb) if e.type == events.MFA_ENABLED]

    r = await browser.post("/account/security/totp/confirm", {"code": code_at(secret, clock())})
    assert r.code == 200
    codes = RECOVERY.findall(r.body.decode())
    assert len(codes) == 10 == len(set(codes))
    group = "[0-9a-hj-km-np-tv-z]{4}"  # Crockford's base32
    assert all(re.fullmatch(f"{group}-{group}-{group}", c) for c in codes)
    [enabled] = [e for e in await read_events(rdb) if e.type == events.MFA_ENABLED]
    assert enabled.user == "ann@example.com" and enabled.ip == "127.0.0.1" and "Firefox" in enabled.user_agent
    dump = await redis_dump(rdb)
    assert secret.encode() not in dump and b"otpauth" not in dump
    for c in codes:
        assert c.encode() not in dump and c.replace("-", "").encode() not in dump
    page = (await browser.get("/account/security")).body.decode()
    assert "On" in page and re.search(r"Recovery codes left: <strong>10</strong>", page)
    # Once on, a new setup is refused and the old secret stays.
    assert (await browser.post("/account/security/totp")).code == 400


async def test_two_step_login(browser: Browser, new_browser, rdb, clock, settings) -> None:
    secret, _ = await enable(browser, clock, "bo@example.com")
    before = len(await logins(rdb))
    r = await password_step(browser, "bo@example.com", next="/account/security")
    assert "sid" not in browser.cookies  # no session yet
    assert len(await logins(rdb)) == before  # and no login event
    assert (await browser.get("/account")).code == 302
    assert [k for k in await rdb.keys("sa:lp:*")]  # the pending step, named by a hash only
    value = tornado.web.decode_signed_value(settings.cookie_secret, "login_step", browser.cookies["login_step"])
    token = value.split(b".")[0]
    assert len(token) >= 43 and token not in await redis_dump(rdb)
    page = await browser.get("/login/verify")
    assert page.code == 200 and 'name="code"' in page.body.decode()

    clock.advance(30)
    r = await browser.post("/login/verify", {"code": code_at(secret, clock())})
    assert r.code == 303 and r.headers["Location"] == "/account/security"
    assert "sid" in browser.cookies and "device" in browser.cookies and "login_step" not in browser.cookies
    assert (await browser.get("/account")).code == 200
    login = (await logins(rdb))[-1]
    assert login.reason == events.BY_TOTP and login.user == "bo@example.com"
    # The step is consumed: the same cookie cannot finish another login.
    assert not await rdb.keys("sa:lp:*")


async def test_a_long_next_is_not_kept_in_the_pending_step(browser: Browser, rdb, clock) -> None:
    """A review parked 66 KB in Redis per login through ``next``; past 2,048 characters it is dropped."""
    secret, _ = await enable(browser, clock, "far@example.com")
    await password_step(browser, "far@example.com", next="/account/security?" + "a" * 60_000)
    [key] = await rdb.keys("sa:lp:*")
    assert await rdb.memory_usage(key) < 1024
    clock.advance(30)
    r = await browser.post("/login/verify", {"code": code_at(secret, clock())})
    assert r.code == 303 and r.headers["Location"] == "/account"
    await password_step(browser, "far@example.com", next="/account/security?" + "a" * 1_000)
    clock.advance(30)
    r = await browser.post("/login/verify", {"code": code_at(secret, clock())})
    assert r.code == 303 and r.headers["Location"] == "/account/security?" + "a" * 1_000


async def test_a_code_is_accepted_once_also_by_another_process(browser: Browser, new_browser, rdb, clock,
                                                               settings, redis_url) -> None:
    secret, _ = await enable(browser, clock, "cy@example.com")
    clock.advance(30)
    code = code_at(secret, clock())
    await password_step(browser, "cy@example.com")
    assert (await browser.post("/login/verify", {"code": code})).code == 303
    # A second server process on the same Redis (its own client, its own app) refuses the same code.
    import redis.asyncio as aioredis
    other_client = aioredis.Redis.from_url(redis_url)
    try:
        async with serving(make_app(settings, other_client, clock)) as base:
            other = Browser(browser.client, base)
            r = await other.login("cy@example.com")
            assert r.headers["Location"] == "/login/verify"
            r = await other.post("/login/verify", {"code": code})
            # Said as such (a newcomer trying it right after setup took "not right" for a clock problem).
            assert r.code == 401 and "each code works once" in r.body.decode()
            # An older code (one step back, within the drift) is refused too: it is not after the last one.
            r = await other.post("/login/verify", {"code": code_at(secret, clock() - 30)})
            assert r.code == 401 and "each code works once" in r.body.decode()
            near = {code_at(secret, clock() + d) for d in (-30, 0, 30)}
            wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in near)
            r = await other.post("/login/verify", {"code": wrong})
            assert r.code == 401 and "not right" in r.body.decode()
            clock.advance(30)
            assert (await other.post("/login/verify", {"code": code_at(secret, clock())})).code == 303
    finally:
        await other_client.aclose()
    failed = [e for e in await read_events(rdb) if e.type == events.LOGIN_FAILED]
    assert [e.reason for e in failed] == [events.BAD_CODE] * 3
    assert all(e.user == "cy@example.com" for e in failed)


async def test_one_step_of_drift_either_way(browser: Browser, rdb, clock) -> None:
    secret, _ = await enable(browser, clock, "di@example.com")
    clock.advance(300)
    await password_step(browser, "di@example.com")
    assert (await browser.post("/login/verify", {"code": code_at(secret, clock() + 60)})).code == 401  # 2 ahead
    assert (await browser.post("/login/verify", {"code": code_at(secret, clock() - 60)})).code == 401  # 2 behind
    assert (await browser.post("/login/verify", {"code": code_at(secret, clock() - 30)})).code == 303  # 1 behind
    clock.advance(30)
    await password_step(browser, "di@example.com")
    assert (await browser.post("/login/verify", {"code": code_at(secret, clock() + 30)})).code == 303  # 1 ahead
    # That code's step is now the last accepted: the phone's current code, one step earlier, is refused.
    await password_step(browser, "di@example.com")
    assert (await browser.post("/login/verify", {"code": code_at(secret, clock())})).code == 401


@pytest.mark.parametrize("typed", ["", "12345", "1234567", "abcdef", "x" * 5000, "١٢٣٤٥٦", "12 34 5\u00006"])
async def test_malformed_codes_are_wrong_codes(browser: Browser, rdb, clock, typed: str) -> None:
    await enable(browser, clock, "mal@example.com")
    await password_step(browser, "mal@example.com")
    r = await browser.post("/login/verify", {"code": typed})
    assert r.code == 401 and "sid" not in browser.cookies
    assert (await read_events(rdb))[-1].reason == events.BAD_CODE


async def test_wrong_codes_are_throttled_like_passwords(browser: Browser, new_browser, rdb, clock,
                                                        settings) -> None:
    secret, _ = await enable(browser, clock, "ed@example.com")
    await password_step(browser, "ed@example.com")
    wrong = f"{(int(code_at(secret, clock())) + 1) % 1_000_000:06d}"
    for _ in range(settings.login_account_threshold):
        r = await browser.post("/login/verify", {"code": wrong})
        assert r.code == 401
    # Throttled now: even the right code (one step ahead) waits, with Retry-After, recorded as throttled.
    r = await browser.post("/login/verify", {"code": code_at(secret, clock() + 30)})
    assert r.code == 429 and int(r.headers["Retry-After"]) >= 1
    kinds = [(e.type, e.reason) for e in await read_events(rdb) if e.type in (events.LOGIN_FAILED, events.LOCKED_OUT)]
    assert kinds[:settings.login_account_threshold] == [(events.LOGIN_FAILED, events.BAD_CODE)] * 3
    assert (events.LOCKED_OUT, "device") in kinds and kinds[-1] == (events.LOGIN_FAILED, events.THROTTLED)
    # The same counters as passwords: this browser's password step is throttled too.
    await browser.logout()
    assert (await browser.login("ed@example.com")).code == 429
    # Once the backoff has passed, the right code works (and the step had not expired).
    clock.advance(int(r.headers["Retry-After"]))
    r = await browser.post("/login/verify", {"code": code_at(secret, clock() + 30)})
    assert r.code == 303, r.body


async def test_the_password_step_does_not_clear_the_failures(browser: Browser, new_browser, rdb, clock,
                                                             settings) -> None:
    """An attacker who knows the password cannot reset the code counter by entering it again."""
    secret, _ = await enable(browser, clock, "fi@example.com")
    attacker = new_browser()
    wrong = f"{(int(code_at(secret, clock())) + 1) % 1_000_000:06d}"
    for _ in range(settings.login_account_threshold):
        assert (await attacker.login("fi@example.com")).headers["Location"] == "/login/verify"
        assert (await attacker.post("/login/verify", {"code": wrong})).code == 401
    assert (await attacker.login("fi@example.com")).code == 429


async def test_the_pending_step_expires(browser: Browser, rdb, clock) -> None:
    secret, _ = await enable(browser, clock, "fa@example.com")
    await password_step(browser, "fa@example.com")
    clock.advance(301)
    page = await browser.get("/login/verify")
    assert page.code == 400 and "expired" in page.body.decode() and 'href="/login"' in page.body.decode()
    r = await browser.post("/login/verify", {"code": code_at(secret, clock())})
    assert r.code == 400 and "Log in again" in r.body.decode()
    assert "sid" not in browser.cookies
    assert [e.reason for e in await logins(rdb)] == [events.BY_PASSWORD]  # the registration's only


async def test_another_browser_cannot_finish_the_step(browser: Browser, new_browser, rdb, clock) -> None:
    secret, _ = await enable(browser, clock, "ga@example.com")
    await password_step(browser, "ga@example.com")
    clock.advance(30)
    code = code_at(secret, clock())
    thief = new_browser()
    await thief.get("/login")
    assert (await thief.post("/login/verify", {"code": code})).code == 400
    thief.cookies["login_step"] = browser.cookies["login_step"].replace("|", "x", 1)  # forged signature
    assert (await thief.post("/login/verify", {"code": code})).code == 400
    assert "sid" not in thief.cookies
    assert (await browser.post("/login/verify", {"code": code})).code == 303


async def test_a_recovery_code_works_once(browser: Browser, rdb, clock) -> None:
    _, codes = await enable(browser, clock, "ha@example.com")
    await password_step(browser, "ha@example.com")
    typed = codes[3].upper().replace("-", " ")  # as people type it
    r = await browser.post("/login/verify", {"code": typed})
    assert r.code == 303
    assert (await logins(rdb))[-1].reason == events.BY_RECOVERY_CODE
    page = (await browser.get("/account/security")).body.decode()
    assert re.search(r"Recovery codes left: <strong>9</strong>", page)
    await password_step(browser, "ha@example.com")
    r = await browser.post("/login/verify", {"code": codes[3]})
    assert r.code == 401
    assert (await read_events(rdb))[-1].reason == events.BAD_CODE
    assert (await browser.post("/login/verify", {"code": codes[4]})).code == 303


async def test_turning_it_off_needs_the_password_and_a_code(browser: Browser, rdb, clock) -> None:
    secret, _ = await enable(browser, clock, "ia@example.com")
    clock.advance(30)
    good = code_at(secret, clock())
    r = await browser.post("/account/security/totp/disable", {"password": "not it at all", "code": good})
    assert r.code == 400 and "password is not right" in r.body.decode()
    r = await browser.post("/account/security/totp/disable", {"password": PASSWORD, "code": "000000"})
    assert r.code == 400 and "code is not right" in r.body.decode()
    assert await rdb.exists(keys.MFA + "1")
    r = await browser.post("/account/security/totp/disable", {"password": PASSWORD, "code": good})
    assert r.code == 303 and r.headers["Location"] == "/account/security?done=totp-off"
    [off] = [e for e in await read_events(rdb) if e.type == events.MFA_DISABLED]
    assert off.reason == events.BY_USER and off.user == "ia@example.com" and off.actor is None
    assert not await rdb.exists(keys.MFA + "1", keys.RECOVERY + "1")
    await browser.logout()
    r = await browser.login("ia@example.com")
    assert r.code == 303 and r.headers["Location"] == "/account"
    assert (await logins(rdb))[-1].reason == events.BY_PASSWORD


async def test_an_admin_resets_a_users_factors(browser: Browser, new_browser, rdb, clock) -> None:
    await enable(browser, clock, "lost@example.com")
    admin = new_browser()
    await register_admin(admin, rdb, "boss@example.com")
    page = (await admin.get("/admin/users/1")).body.decode()
    assert "Second factors" in page and "10 recovery code(s) left" in page
    assert (await browser.post("/admin/users/1/mfa/reset")).code == 403  # not for the user themselves
    r = await admin.post("/admin/users/1/mfa/reset")
    assert r.code == 303 and r.headers["Location"] == "/admin/users/1"
    reset = (await read_events(rdb))[-1]
    assert (reset.type, reset.reason, reset.actor, reset.user) == (
        events.MFA_DISABLED, events.BY_ADMIN, "boss@example.com", "lost@example.com")
    assert "Remove all second factors" not in (await admin.get("/admin/users/1")).body.decode()
    # The live view labels the new events as the pages do (follow.js reads the labels from the page).
    audit = html.unescape((await admin.get("/admin/audit")).body.decode())
    assert '"mfa_disabled": "Two-step off"' in audit and '"passkey_added": "Passkey added"' in audit
    assert (await admin.post("/admin/users/99/mfa/reset")).code == 404
    # The user signs in with the password alone again.
    await browser.logout()
    assert (await browser.login("lost@example.com")).headers["Location"] == "/account"


async def test_the_dashboard_counts_logins_by_method(browser: Browser, new_browser, rdb, clock) -> None:
    secret, codes = await enable(browser, clock, "ja@example.com")  # the registration: a password login
    clock.advance(30)
    await password_step(browser, "ja@example.com")
    await browser.post("/login/verify", {"code": code_at(secret, clock())})
    await password_step(browser, "ja@example.com")
    await browser.post("/login/verify", {"code": codes[0]})
    await make_admin(rdb, "ja@example.com")
    page = (await browser.get("/admin")).body.decode()
    counts = dict(re.findall(r'data-method="(\w+)">(\d+)<', page))
    assert counts == {"password": "1", "totp": "1", "recovery_code": "1", "passkey": "0"}


async def test_pages_need_a_session(browser: Browser) -> None:
    r = await browser.get("/account/security")
    assert r.code == 302 and r.headers["Location"] == "/login?next=%2Faccount%2Fsecurity"
    for path in ("/account/security/totp", "/account/security/totp/confirm", "/account/security/totp/disable"):
        assert (await browser.post(path, {"code": "123456"})).code == 403


async def test_a_rotated_cookie_secret_keeps_factors_working(browser: Browser, rdb, clock, settings) -> None:
    """COOKIE_SECRET rotated as docs/deploy.md says (``1:old,2:new``, then ``2:new``): TOTP secrets and
    recovery codes made under the old secret still work, because a process with both re-sealed the data key."""
    import dataclasses
    secret, codes = await enable(browser, clock, "rot@example.com")
    new = "a-newer-cookie-secret-0123456789"
    both = dataclasses.replace(settings, cookie_secret={**settings.cookie_secret, 2: new})
    newest = dataclasses.replace(settings, cookie_secret={2: new})
    sealed = await rdb.get(keys.MFA_KEY)
    started = make_app(both, rdb, clock)
    try:
        await started.ctx.factors.data_key()  # what `serve` does at start
    finally:
        started.ctx.close()
    assert await rdb.get(keys.MFA_KEY) != sealed
    async with serving(make_app(newest, rdb, clock)) as base:
        other = Browser(browser.client, base)
        await password_step(other, "rot@example.com")
        assert (await other.post("/login/verify", {"code": code_at(secret, clock() + 30)})).code == 303
        await password_step(other, "rot@example.com")
        assert (await other.post("/login/verify", {"code": codes[0]})).code == 303
