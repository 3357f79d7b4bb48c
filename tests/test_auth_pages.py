"""Register, log in, log out through the pages, as a browser and as an attacker would."""

from __future__ import annotations

import asyncio
import urllib.parse

import pytest
import tornado.web

from conftest import PASSWORD, Browser, read_events
from sessionaudit import keys
from sessionaudit.handlers.base import BaseHandler

pytestmark = pytest.mark.gen_test


async def test_register_logs_in_and_shows_account(browser: Browser, rdb) -> None:
    r = await browser.register("Alice@Example.COM")
    assert r.code == 303
    assert r.headers["Location"] == "/account"
    page = await browser.get("/account")
    assert page.code == 200
    assert b"alice@example.com" in page.body
    assert b"Log out" in page.body
    types = [e.type for e in await read_events(rdb)]
    assert types == ["register", "login"]


async def test_session_cookie_flags_and_value(browser: Browser, rdb) -> None:
    await browser.register("a@example.com")
    line = next(c for c in browser.last_set_cookies if c.startswith("sid="))
    lowered = line.lower()
    assert "httponly" in lowered and "samesite=lax" in lowered and "path=/" in lowered
    assert "secure" not in lowered.replace("samesite", "")
    value = browser.cookies["sid"]
    assert value.startswith("2|")  # Tornado signed cookie, version 2
    # Redis holds neither the cookie nor the session id inside it.
    session_id = value.split("|")[-2].split(":", 1)[1]
    dump = b"".join([k for k in await rdb.keys("*")])
    for key in await rdb.keys("*"):
        kind = (await rdb.type(key)).decode()
        if kind == "hash":
            dump += b"".join(k + v for k, v in (await rdb.hgetall(key)).items())
        elif kind == "zset":
            dump += b"".join(await rdb.zrange(key, 0, -1))
        elif kind == "set":
            dump += b"".join(await rdb.smembers(key))
        elif kind == "stream":
            dump += b"".join(b"".join(k + v for k, v in f.items()) for _, f in await rdb.xrange(key))
    import base64
    raw_id = base64.b64decode(session_id + "==")
    assert raw_id not in dump
    assert raw_id.decode() not in dump.decode(errors="replace")


async def test_secure_cookies_flag(http_client, base_url, settings, rdb, clock) -> None:
    # covered through the app fixture's settings in test_security; here the default is not Secure
    b = Browser(http_client, base_url)
    await b.register("s@example.com")
    assert all("; secure" not in c.lower() for c in b.last_set_cookies)


@pytest.mark.parametrize("email,password,confirm,message,reason", [
    ("not-an-email", PASSWORD, PASSWORD, b"valid email", "invalid"),
    ("a@example.com", "short", "short", b"at least 12", "weak_password"),
    ("a@example.com", "password1234", "password1234", b"too common", "weak_password"),
    ("a@example.com", PASSWORD, PASSWORD + "x", b"do not match", "invalid"),
    ("a@example.com", "x" * 1025, "x" * 1025, b"1024 bytes", "invalid"),
    ("alice.smith@example.com", "alice.smith@example.com", "alice.smith@example.com", b"email address",
     "weak_password"),
])
async def test_register_bad_input_is_400_and_changes_nothing(browser: Browser, rdb, email, password, confirm,
                                                             message, reason) -> None:
    r = await browser.post("/register", {"email": email, "password": password, "password_confirm": confirm})
    assert r.code == 400
    assert message in r.body
    assert b'<form method="post" action="/register"' in r.body
    # No account; the refusal is recorded (with the email as typed), nothing else.
    [event] = await read_events(rdb)
    assert (event.type, event.reason, event.user, event.ip) == ("register_failed", reason, email, "127.0.0.1")
    assert "Firefox" in event.user_agent and event.session is None and event.uid is None
    assert await rdb.hlen(keys.EMAILS) == 0
    assert "sid" not in browser.cookies


async def test_long_passphrase_allowed(browser: Browser) -> None:
    passphrase = "a long and winding passphrase about red kites over the hills " * 2  # > 64 characters
    assert (await browser.register("long@example.com", passphrase)).code == 303
    await browser.logout()
    assert (await browser.login("long@example.com", passphrase)).code == 303


async def test_taken_email_is_400(browser: Browser, new_browser) -> None:
    await browser.register("taken@example.com")
    other = new_browser()
    r = await other.register("TAKEN@example.com")
    assert r.code == 400
    assert b"already exists" in r.body


async def test_concurrent_registrations_make_one_account(new_browser, rdb) -> None:
    browsers = [new_browser() for _ in range(6)]
    for b in browsers:
        await b.get("/register")
    results = await asyncio.gather(*(b.register("race@example.com") for b in browsers))
    assert sorted(r.code for r in results) == [303] + [400] * 5
    assert await rdb.hlen(keys.EMAILS) == 1
    assert [e.type for e in await read_events(rdb)].count("register") == 1


async def test_login_success_redirects_and_issues_new_session_each_time(browser: Browser, rdb) -> None:
    await browser.register("bob@example.com")
    first = browser.cookies["sid"]
    r = await browser.login("bob@example.com")
    assert r.code == 303 and r.headers["Location"] == "/account"
    second = browser.cookies["sid"]
    assert first != second
    # Fixation: the old cookie no longer works; the browser's old session ended with its own event.
    old = Browser(browser.client, browser.base_url)
    old.cookies["sid"] = first
    assert (await old.get("/account")).code == 302
    types = [e.type for e in await read_events(rdb)]
    assert types == ["register", "login", "logout", "login"]


async def test_wrong_password_and_unknown_email_look_the_same(browser: Browser, new_browser) -> None:
    await browser.register("carol@example.com")
    wrong = await new_browser().login("carol@example.com", "wrong password entirely")
    unknown = await new_browser().login("nobody@example.com", "wrong password entirely")
    invalid = await new_browser().login("not an email", "wrong password entirely")
    assert wrong.code == unknown.code == invalid.code == 401
    def message(body: bytes) -> bytes:
        return body.split(b'role="alert"', 1)[1].split(b"</div>", 1)[0]
    assert message(wrong.body) == message(unknown.body) == message(invalid.body)


async def test_login_failure_recorded(browser: Browser, new_browser, rdb) -> None:
    await browser.register("dave@example.com")
    await new_browser().login("dave@example.com", "not the password at all")
    failed = [e for e in await read_events(rdb) if e.type == "login_failed"]
    assert len(failed) == 1
    assert failed[0].reason == "bad_credentials" and failed[0].user == "dave@example.com"
    assert failed[0].session is None


@pytest.mark.parametrize("target,expected", [
    ("/admin/audit?type=login", "/admin/audit?type=login"),
    ("https://evil.example/", "/account"),
    ("//evil.example/", "/account"),
    ("/\\evil.example", "/account"),
    ("javascript:alert(1)", "/account"),
])
async def test_next_only_local(browser: Browser, new_browser, target: str, expected: str) -> None:
    await browser.register("next@example.com")
    other = new_browser()
    r = await other.login("next@example.com", next=target)
    assert r.code == 303
    assert r.headers["Location"] == expected


async def test_anonymous_account_redirects_to_login_with_next(browser: Browser) -> None:
    r = await browser.get("/account")
    assert r.code == 302
    assert r.headers["Location"] == "/login?next=%2Faccount"
    page = await browser.get(r.headers["Location"])
    assert b'name="next" value="/account"' in page.body


async def test_logout_destroys_server_side(browser: Browser, rdb) -> None:
    await browser.register("erin@example.com")
    stolen = browser.cookies["sid"]
    r = await browser.logout()
    assert r.code == 303 and r.headers["Location"] == "/"
    assert "sid" not in browser.cookies
    thief = Browser(browser.client, browser.base_url)
    thief.cookies["sid"] = stolen
    assert (await thief.get("/account")).code == 302
    assert [e.type for e in await read_events(rdb)][-1] == "logout"
    assert await rdb.zcard(keys.DEADLINES) == 0


@pytest.mark.parametrize("cookie", [
    "garbage",
    "2|1:0|10:1700000000|3:sid|8:AAAAAAAA|deadbeef",
    "",
])
async def test_tampered_cookie_means_anonymous(browser: Browser, cookie: str) -> None:
    await browser.register("frank@example.com")
    good = browser.cookies["sid"]
    browser.cookies["sid"] = cookie or good[:-2] + ("00" if not good.endswith("00") else "11")
    r = await browser.get("/account")
    assert r.code == 302
    home = await browser.get("/")
    assert home.code == 200 and b"Log in" in home.body


async def test_post_without_xsrf_is_403_and_changes_nothing(browser: Browser, rdb) -> None:
    r = await browser.post("/register", {"email": "x@example.com", "password": PASSWORD,
                                         "password_confirm": PASSWORD}, xsrf=False)
    assert r.code == 403
    assert await rdb.hlen(keys.EMAILS) == 0
    await browser.register("g@example.com")
    r = await browser.post("/logout", {"_xsrf": "2|deadbeef|00|1"}, xsrf=False)
    assert r.code == 403
    assert (await browser.get("/account")).code == 200


async def test_xsrf_token_replaced_at_login_and_logout(browser: Browser) -> None:
    await browser.get("/login")
    before = browser.cookies["_xsrf"]
    await browser.register("h@example.com")
    assert "_xsrf" not in browser.cookies or browser.cookies["_xsrf"] != before
    await browser.get("/account")
    during = browser.cookies["_xsrf"]
    await browser.logout()
    assert "_xsrf" not in browser.cookies or browser.cookies["_xsrf"] != during
    await browser.get("/login")
    assert browser.cookies["_xsrf"] not in (before, during)


async def test_security_headers(browser: Browser) -> None:
    await browser.register("i@example.com")
    for path in ("/", "/login", "/account", "/nope"):
        r = await browser.get(path)
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "same-origin"
    account = await browser.get("/account")
    assert "no-store" in account.headers["Cache-Control"]
    assert b"<script>" not in account.body


async def test_xsrf_cookie_is_httponly_samesite(browser: Browser) -> None:
    await browser.get("/login")
    line = next(c for c in browser.last_set_cookies if c.startswith("_xsrf="))
    assert "httponly" in line.lower() and "samesite=lax" in line.lower()


async def test_oversized_form_is_413(browser: Browser, rdb) -> None:
    await browser.get("/login")
    body = urllib.parse.urlencode({"_xsrf": browser.cookies["_xsrf"], "email": "a@example.com",
                                   "password": "x" * (70 * 1024), "password_confirm": "y"})
    r = await browser.fetch("/register", method="POST", body=body,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.code == 413
    assert b"Too large" in r.body
    assert await rdb.hlen(keys.EMAILS) == 0


@pytest.mark.parametrize("path,code", [("/nope", 404), ("/logout", 405)])
async def test_error_pages_are_plain_pages(browser: Browser, path: str, code: int) -> None:
    r = await browser.get(path)
    assert r.code == code
    assert b"<!doctype html>" in r.body
    assert b"Traceback" not in r.body


async def test_favicon_and_static(browser: Browser) -> None:
    r = await browser.get("/favicon.ico")
    assert r.code == 200 and r.body[:4] == b"\x00\x00\x01\x00"
    home = await browser.get("/")
    css = home.body.split(b'href="', 2)[1].split(b'"', 1)[0].decode()
    assert css.startswith("/static/site.css?v=")
    assert (await browser.get(css)).code == 200


async def test_healthz(browser: Browser) -> None:
    r = await browser.get("/healthz")
    assert r.code == 200 and r.body == b"ok"


def test_every_post_handler_checks_xsrf_after_parsing_its_form(app) -> None:
    """The @form decorator is what checks XSRF for streamed bodies: no POST method may lack it."""
    handlers = [rule.target for rule in app.wildcard_router.rules if isinstance(rule.target, type)]
    posts = [h for h in handlers if h.post not in (tornado.web.RequestHandler.post, BaseHandler.post)]
    assert len(posts) >= 8
    for handler in posts:
        assert getattr(handler.post, "parses_form", False), handler.__name__


async def test_login_rehashes_a_hash_with_old_costs(browser: Browser, rdb, app) -> None:
    import argon2
    old = argon2.PasswordHasher(time_cost=1, memory_cost=512, parallelism=1).hash(PASSWORD)
    await app.ctx.users.create("old@example.com", old)
    assert (await browser.login("old@example.com")).code == 303
    stored = (await rdb.hget(keys.USER + "1", "hash")).decode()
    assert stored != old and stored.startswith("$argon2id$")
    assert "m=1024" in stored  # the site's (test) costs
    await browser.logout()
    assert (await browser.login("old@example.com")).code == 303


async def test_unknown_email_costs_a_verify_too(browser: Browser, new_browser, app) -> None:
    """Timing does not tell which emails exist: an unknown one is verified against a dummy hash."""
    await browser.register("known@example.com")
    hashes = app.ctx.metrics.hash_seconds

    def count() -> float:
        return next(s.value for m in hashes.collect() for s in m.samples if s.name.endswith("_count"))

    before = count()
    await new_browser().login("known@example.com", "a wrong password here")
    await new_browser().login("unknown@example.com", "a wrong password here")
    await new_browser().login("not-even-an-email", "a wrong password here")
    assert count() - before == 3
