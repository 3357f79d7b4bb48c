"""Forgotten passwords: the same answer for every email, links by mail, single use, newest only, 30 minutes,
throttled, a flood that costs bounded events, the admin's action, and a token that is written nowhere."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import hashlib
import logging
import re
from pathlib import Path

import pytest

from conftest import PASSWORD, Browser, read_events, register_admin
from sessionaudit import events, keys, resets, throttle

pytestmark = pytest.mark.gen_test

NEW_PASSWORD = "a completely different passphrase"
LINK = re.compile(r"(https?://[^/\s]+)/password/reset/([A-Za-z0-9_-]{43})")


def outbox(settings) -> list[email.message.EmailMessage]:
    """The messages written to the outbox, oldest first."""
    folder = Path(settings.data_dir) / "outbox"
    files = sorted(folder.glob("*.eml")) if folder.is_dir() else []
    return [email.message_from_bytes(f.read_bytes(), policy=email.policy.default) for f in files]


async def mailed_link(app, settings, to: str) -> tuple[str, str]:
    """(origin, token) of the newest link mailed to ``to``."""
    await app.ctx.mailer.idle()
    mine = [m for m in outbox(settings) if m["To"] == to]
    assert mine, f"no mail to {to}"
    found = LINK.search(mine[-1].get_content())
    assert found, mine[-1].get_content()
    return found.group(1), found.group(2)


async def forgot(b: Browser, address: str, **kw):
    return await b.post("/password/forgot", {"email": address}, **kw)


async def all_values(rdb) -> list[bytes]:
    """Every key name and every value in Redis, whatever its type."""
    out: list[bytes] = []
    async for key in rdb.scan_iter(count=1000):
        out.append(key)
        kind = (await rdb.type(key)).decode()
        if kind == "string":
            out.append(await rdb.get(key))
        elif kind == "hash":
            for k, v in (await rdb.hgetall(key)).items():
                out += [k, v]
        elif kind == "set":
            out += list(await rdb.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in await rdb.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in await rdb.xrange(key):
                for k, v in fields.items():
                    out += [k, v]
    return out


async def test_the_answer_is_the_same_whether_or_not_the_account_exists(browser: Browser, new_browser, rdb, app,
                                                                        settings) -> None:
    await browser.register("known@example.com")
    await browser.logout()
    answers = {}
    for address in ("known@example.com", "unknown@example.com"):
        r = await forgot(new_browser(), address)
        assert r.code == 200
        assert b"a link to choose a new password is on its way" in r.body
        headers = sorted((k, v) for k, v in r.headers.get_all()
                         if k not in ("Date", "X-Request-Id", "Set-Cookie", "Content-Length"))
        answers[address] = (r.body.replace(address.encode(), b"EMAIL"), headers)
    assert answers["known@example.com"] == answers["unknown@example.com"]

    # Both are in the trail, under the email as typed (the unknown one too: probing shows).
    asked = [e for e in await read_events(rdb) if e.type == events.PASSWORD_RESET_REQUESTED]
    assert [(e.user, bool(e.uid), e.actor, e.reason, e.ip) for e in asked] == [
        ("known@example.com", True, None, None, "127.0.0.1"), ("unknown@example.com", False, None, None, "127.0.0.1")]
    assert all(e.user_agent and "Firefox" in e.user_agent for e in asked)

    # Only the account gets a mail, with a link on the configured origin.
    origin, token = await mailed_link(app, settings, "known@example.com")
    assert origin == settings.origin
    assert [m["To"] for m in outbox(settings)] == ["known@example.com"]
    # Redis holds the token's hash, never the token.
    values = await all_values(rdb)
    assert any(hashlib.sha256(token.encode()).hexdigest().encode() in v for v in values)
    assert not any(token.encode() in v for v in values)


async def test_bad_input_gets_400_and_records_nothing(browser: Browser, rdb) -> None:
    for typed in ("", "not an address", "a@b@example.com", "x" * 300 + "@example.com"):
        r = await forgot(browser, typed)
        assert r.code == 400 and b"Enter a valid email address" in r.body
    assert (await browser.post("/password/forgot", {"email": "a@example.com"}, xsrf=False)).code == 403
    assert await read_events(rdb) == []


async def test_the_link_sets_a_new_password_and_ends_every_session(browser: Browser, new_browser, rdb, app,
                                                                   settings) -> None:
    await browser.register("ada@example.com")
    phone = new_browser()
    await phone.login("ada@example.com")
    anonymous = new_browser()
    assert (await forgot(anonymous, "ada@example.com")).code == 200
    _, token = await mailed_link(app, settings, "ada@example.com")
    path = "/password/reset/" + token

    page = await anonymous.get(path)
    assert page.code == 200 and b"Choose a new password" in page.body and b"ada@example.com" in page.body
    assert page.headers["Referrer-Policy"] == "no-referrer"  # the link never leaves in a Referer
    mismatch = await anonymous.post(path, {"password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD + "!"})
    assert mismatch.code == 400 and b"do not match" in mismatch.body
    weak = await anonymous.post(path, {"password": "password1234", "password_confirm": "password1234"})
    assert weak.code == 400 and b"too common" in weak.body
    too_long = "x" * 1025
    assert (await anonymous.post(path, {"password": too_long, "password_confirm": too_long})).code == 400
    assert (await browser.get("/account")).code == 200  # nothing changed yet

    done = await anonymous.post(path, {"password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD})
    assert done.code == 303 and done.headers["Location"] == "/login"
    login_page = await anonymous.get("/login")
    assert b"Your password has been changed" in login_page.body
    assert b"Your password has been changed" not in (await anonymous.get("/login")).body  # shown once

    for b in (browser, phone):
        assert (await b.get("/account")).code == 302
    assert (await new_browser().login("ada@example.com")).code == 401
    assert (await new_browser().login("ada@example.com", NEW_PASSWORD)).code == 303

    evs = await read_events(rdb)
    changed = [e for e in evs if e.type == events.PASSWORD_CHANGED]
    assert [(e.user, e.reason, e.actor) for e in changed] == [("ada@example.com", "reset", None)]
    revoked = [e for e in evs if e.type == events.REVOKED]
    assert [(e.reason, e.actor) for e in revoked] == [("password_reset", None)] * 2
    assert evs.index(changed[0]) < evs.index(revoked[0])

    # Single use: the link now gets the 400 page, with a way to ask again; so does a made-up one.
    for attempt in (anonymous.get(path), anonymous.post(path, {"password": PASSWORD, "password_confirm": PASSWORD}),
                    anonymous.get("/password/reset/" + "A" * 43), anonymous.get("/password/reset/short"),
                    anonymous.get("/password/reset/" + token + "/more")):
        r = await attempt
        assert r.code == 400 and b"This link does not work" in r.body and b'href="/password/forgot"' in r.body
    assert (await new_browser().login("ada@example.com", NEW_PASSWORD)).code == 303


async def test_only_the_newest_link_works(browser: Browser, app, settings) -> None:
    await browser.register("bo@example.com")
    await forgot(browser, "bo@example.com")
    _, first = await mailed_link(app, settings, "bo@example.com")
    await forgot(browser, "bo@example.com")
    _, second = await mailed_link(app, settings, "bo@example.com")
    assert first != second
    assert (await browser.get("/password/reset/" + first)).code == 400
    assert (await browser.get("/password/reset/" + second)).code == 200


async def test_links_work_for_30_minutes(browser: Browser, app, settings, clock) -> None:
    await browser.register("cy@example.com")
    await forgot(browser, "cy@example.com")
    _, token = await mailed_link(app, settings, "cy@example.com")
    clock.advance(resets.TOKEN_TTL - 1)
    assert (await browser.get("/password/reset/" + token)).code == 200
    clock.advance(1)
    expired = await browser.post("/password/reset/" + token, {"password": NEW_PASSWORD,
                                                              "password_confirm": NEW_PASSWORD})
    assert expired.code == 400 and b"This link does not work" in expired.body
    await browser.logout()
    assert (await browser.login("cy@example.com")).code == 303  # the old password still works


async def test_a_disabled_account_gets_no_link(browser: Browser, new_browser, rdb, app, settings) -> None:
    await browser.register("off@example.com")
    await forgot(browser, "off@example.com")
    _, token = await mailed_link(app, settings, "off@example.com")
    await rdb.hset(keys.USER + "1", "disabled", "1")
    assert (await browser.get("/password/reset/" + token)).code == 400  # nor does an earlier one work
    r = await forgot(new_browser(), "off@example.com")
    assert r.code == 200 and b"is on its way" in r.body
    await app.ctx.mailer.idle()
    assert len(outbox(settings)) == 1


async def test_requests_are_throttled_per_email_and_per_address(new_browser, rdb, settings, clock, app) -> None:
    b = new_browser()
    await b.register("dee@example.com")
    codes = {}
    for address in ("dee@example.com", "nobody@example.com"):  # the same for an unknown email: no hint
        seq = [(await forgot(new_browser(), address)).code for _ in range(settings.login_account_threshold + 2)]
        codes[address] = seq
    expected = [200] * settings.login_account_threshold + [429] * 2
    assert codes["dee@example.com"] == codes["nobody@example.com"] == expected
    r = await forgot(new_browser(), "dee@example.com")
    assert r.code == 429 and 1 <= int(r.headers["Retry-After"]) <= settings.login_backoff_max
    assert b"Too many requests" in r.body
    clock.advance(int(r.headers["Retry-After"]))
    assert (await forgot(new_browser(), "dee@example.com")).code == 200
    await app.ctx.mailer.idle()
    assert len(outbox(settings)) == settings.login_account_threshold + 1  # none while throttled

    clock.advance(settings.login_backoff_max)
    await app.ctx.throttle.flush_due()
    throttled = [e for e in await read_events(rdb) if e.type == events.PASSWORD_RESET_REQUESTED
                 and e.reason == events.THROTTLED]
    by_user = {u: sum(e.count for e in throttled if e.user == u) for u in ("dee@example.com", "nobody@example.com")}
    assert by_user == {"dee@example.com": 3, "nobody@example.com": 2}  # every refused request is counted


async def test_requests_from_one_address_are_throttled_whatever_the_email(new_browser, settings) -> None:
    sent = 0
    while (r := await forgot(new_browser(), f"spray{sent}@example.com")).code == 200:
        sent += 1
        assert sent <= settings.login_address_threshold
    assert sent == settings.login_address_threshold
    assert r.code == 429 and int(r.headers["Retry-After"]) >= 1


async def test_a_flood_of_requests_records_a_bounded_number_of_events(rdb, settings, clock) -> None:
    """Ever new emails from ever new addresses: past the door's budget a minute, requests are summarised."""
    settings = dataclasses.replace(settings, door_budget=100)
    store = resets.ResetStore(rdb, settings, clock)
    flood = settings.door_budget * 4
    before = await rdb.xlen(keys.AUDIT)
    for i in range(flood):
        asked = await store.request(f"flood{i}@example.com", ip=f"10.0.{i // 256}.{i % 256}", user_agent=f"bot/{i}")
        assert asked.retry_after == 0 and asked.token is None
    assert await rdb.xlen(keys.AUDIT) - before == settings.door_budget + 1  # the budget, then one opening a window
    clock.advance(61)
    await throttle.Throttle(rdb, settings, clock).flush_due()
    asked = [e for e in await read_events(rdb) if e.type == events.PASSWORD_RESET_REQUESTED]
    assert len(asked) == settings.door_budget + 2
    assert sum(e.count for e in asked) == flood  # and the summary says how many there were
    summarised = flood - settings.door_budget - 1
    assert asked[-1].count == summarised and asked[-1].agents and asked[-1].agents > 0.95 * summarised
    # What is left per request is its throttle counters, which expire with the window.
    for key in [k async for k in rdb.scan_iter(match="sa:f:p*", count=1000)][:50]:
        assert 0 < await rdb.pttl(key) <= settings.login_window * 1000


async def test_an_admin_sends_a_reset(new_browser, rdb, app, settings) -> None:
    admin = new_browser()
    await register_admin(admin, rdb, "boss@example.com")
    user = new_browser()
    await user.register("eve@example.com")
    page = await admin.get("/admin/users/2")
    assert b"Send password reset" in page.body
    assert (await user.post("/admin/users/2/reset")).code == 403
    r = await admin.post("/admin/users/2/reset")
    assert r.code == 303 and r.headers["Location"] == "/admin/users/2?reset=sent"
    assert b"A password reset link is on its way to eve@example.com" in (await admin.get(r.headers["Location"])).body
    _, token = await mailed_link(app, settings, "eve@example.com")
    assert (await new_browser().get("/password/reset/" + token)).code == 200
    asked = [e for e in await read_events(rdb) if e.type == events.PASSWORD_RESET_REQUESTED]
    assert [(e.user, e.actor) for e in asked] == [("eve@example.com", "boss@example.com")]
    assert (await admin.post("/admin/users/99/reset")).code == 404
    assert (await admin.post("/admin/users/2/disable")).code == 303
    refused = await admin.post("/admin/users/2/reset")
    assert refused.code == 400 and b"disabled" in refused.body


async def test_the_token_is_written_to_no_log(browser: Browser, new_browser, app, settings, caplog) -> None:
    caplog.set_level(logging.INFO)
    await browser.register("fay@example.com")
    await forgot(browser, "fay@example.com")
    _, token = await mailed_link(app, settings, "fay@example.com")
    path = "/password/reset/" + token
    assert (await browser.get(path)).code == 200
    assert (await browser.post(path, {"password": "x", "password_confirm": "x"}, xsrf=False)).code == 403  # CSRF
    assert (await browser.fetch(path, method="PATCH", body=b"")).code == 405
    assert (await browser.post(path, {"password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD})).code == 303
    assert (await browser.get(path)).code == 400
    logged = [r.getMessage() + " " + str(getattr(r, "path", "")) for r in caplog.records]
    assert any("/password/reset/<token>" in line for line in logged)  # the access lines are there...
    assert any("written to" in line for line in logged)  # ...and the outbox line
    assert not [line for line in logged if token in line or token[:16] in line]  # ...but never the token
