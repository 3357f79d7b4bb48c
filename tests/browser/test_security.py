"""Second factors in the browser: an authenticator app (codes from pyotp) and passkeys through a
CDP virtual authenticator, with axe-core on every page on the way."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pyotp
import redis
from playwright.sync_api import expect

from conftest import PASSWORD, UA_FIREFOX

from .conftest import AXE_JS, Site, log_out, register, screenshot_path
from .test_pages import AXE_RUN, BLOCKING, SIDEWAYS, WIDTHS

PASSKEY_ROWS = "table[aria-labelledby='passkeys-heading'] tbody tr"


def axe_clean(page: Any, name: str) -> None:
    """At desktop and phone widths, the page as it is now: axe-core finds nothing serious, nothing is
    wider than the window, and a screenshot is kept."""
    found = []
    for width in WIDTHS.values():
        page.set_viewport_size(width)
        page.screenshot(path=screenshot_path(name, width["width"]), full_page=True)
        assert page.evaluate(SIDEWAYS) <= 0, f"{name} is wider than {width['width']} px"
        page.evaluate(AXE_JS.read_text())
        found += [v for v in page.evaluate(AXE_RUN) if v["impact"] in BLOCKING]
    page.set_viewport_size(WIDTHS["desktop"])
    assert not found, f"axe-core on {name}:\n" + json.dumps(found, indent=1)


def trail(site: Site) -> list[dict[bytes, bytes]]:
    client = redis.Redis.from_url(site.redis_url)
    try:
        return [fields for _, fields in client.xrange("audit:log")]
    finally:
        client.close()


def test_an_authenticator_app_from_setup_to_sign_in(site: Site, new_context: Callable[..., Any]) -> None:
    page = new_context(site).new_page()
    register(page, "tess@example.com")
    page.get_by_role("link", name="Two-step sign-in and passkeys").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign-in security")
    axe_clean(page, "security-off")

    page.get_by_role("button", name="Set up an authenticator app").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Set up an authenticator app")
    expect(page.get_by_role("img", name="QR code of the authenticator key")).to_be_visible()
    secret = page.locator("[data-totp-secret]").get_attribute("data-totp-secret") or ""
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    expect(page.locator("[data-totp-secret]")).to_have_text(secret)
    axe_clean(page, "totp-setup")

    totp = pyotp.TOTP(secret)
    page.get_by_label("Type the six-digit code your app shows now").fill(totp.now())
    page.get_by_role("button", name="Turn on two-step sign-in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Two-step sign-in is on")
    codes = page.locator("[data-recovery-code]")
    expect(codes).to_have_count(10)
    axe_clean(page, "recovery-codes")
    page.get_by_role("link", name="I have saved them").click()
    expect(page.locator("#recovery-left")).to_contain_text("10")

    log_out(page)
    page.goto("/login")
    page.get_by_label("Email").fill("tess@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/login/verify")
    axe_clean(page, "login-verify")
    page.get_by_label("Code").fill("000000")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not right")
    expect(page.get_by_label("Code")).to_have_attribute("aria-describedby", "code-help form-error")
    page.get_by_label("Code").fill(totp.at(time.time() + 30))  # the next step: the one used to turn it on is spent
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/account")
    reasons = [(f[b"t"], f[b"r"]) for f in trail(site) if f[b"t"] in (b"login", b"login_failed")]
    assert reasons[-2:] == [(b"login_failed", b"bad_code"), (b"login", b"totp")]


def test_passkeys_added_used_and_removed(start_site: Callable[..., Site], new_context: Callable[..., Any]) -> None:
    site = start_site(host="localhost")  # a secure context with a host name: WebAuthn refuses IP addresses
    context = new_context(site)
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    authenticator = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
        "isUserVerified": True, "automaticPresenceSimulation": True}})["authenticatorId"]

    register(page, "pia@example.com")
    page.goto("/account/security")
    add = page.get_by_role("button", name="Add a passkey")
    expect(add).to_be_visible()
    page.get_by_label("Name for the new passkey").fill("This laptop")
    add.click()
    page.wait_for_url("**/account/security?done=passkey-added")
    expect(page.get_by_role("status").first).to_contain_text("Your passkey was added")
    expect(page.locator(PASSKEY_ROWS)).to_have_count(1)
    expect(page.locator(PASSKEY_ROWS).first).to_contain_text("This laptop")
    expect(page.locator(PASSKEY_ROWS).first).to_contain_text("never")
    axe_clean(page, "security-passkey")
    stored = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})["credentials"]
    assert len(stored) == 1 and stored[0]["isResidentCredential"] and stored[0]["rpId"] == "localhost"

    log_out(page)
    page.goto("/login")
    axe_clean(page, "login-passkey")
    page.get_by_role("button", name="Sign in with a passkey").click()  # no email, no password
    page.wait_for_url("**/account")
    expect(page.locator("dl.facts")).to_contain_text("pia@example.com")
    logins = [f for f in trail(site) if f[b"t"] == b"login"]
    assert logins[-1][b"r"] == b"passkey"

    page.goto("/account/security")
    row = page.locator(PASSKEY_ROWS).first
    expect(row).not_to_contain_text("never")  # last used: now
    row.get_by_label(re.compile("^New name for")).fill("Work laptop")
    row.get_by_role("button", name=re.compile("^Rename")).click()
    page.wait_for_url("**/account/security?done=passkey-renamed")
    row = page.locator(PASSKEY_ROWS).first
    expect(row.locator(".passkey-name")).to_have_text("Work laptop")
    # The account's last second factor: removing it takes the password.
    row.get_by_label(re.compile("Your password")).fill(PASSWORD)
    row.get_by_role("button", name=re.compile("^Remove")).click()
    page.wait_for_url("**/account/security?done=passkey-removed")
    expect(page.locator(PASSKEY_ROWS)).to_have_count(0)
    assert trail(site)[-1][b"t"] == b"passkey_removed"

    # The authenticator still holds the passkey; the site no longer knows it.
    log_out(page)
    page.goto("/login")
    page.get_by_role("button", name="Sign in with a passkey").click()
    expect(page.get_by_role("alert")).to_contain_text("not registered here")
    expect(page).to_have_url(re.compile(r"/login/passkey$"))


def test_without_javascript_the_passkey_buttons_stay_hidden(start_site: Callable[..., Site],
                                                            new_context: Callable[..., Any]) -> None:
    site = start_site(host="localhost")
    page = new_context(site, java_script_enabled=False).new_page()
    page.goto("/login")
    expect(page.get_by_role("button", name="Sign in with a passkey")).to_be_hidden()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    register(page, "nojs@example.com")
    page.goto("/account/security")
    expect(page.get_by_role("button", name="Add a passkey")).to_be_hidden()
    expect(page.get_by_text("Adding a passkey needs JavaScript")).to_be_visible()
    expect(page.get_by_role("button", name="Set up an authenticator app")).to_be_visible()


def test_a_session_that_moved_adds_a_passkey_only_with_the_password(start_site: Callable[..., Site],
                                                                    new_context: Callable[..., Any]) -> None:
    """The session's cookie in another browser (it moved): the form asks for the password, the script
    sends it with the options request, a wrong one is refused on the page, the right one adds the key."""
    site = start_site(host="localhost")
    first = new_context(site, user_agent=UA_FIREFOX)
    owner = first.new_page()
    register(owner, "mo@example.com")
    owner.goto("/account/security")  # loaded while the sign-in is fresh: no password field
    expect(owner.locator("#passkey-password")).to_have_count(0)
    context = new_context(site, storage_state=first.storage_state())  # Chromium's own user agent
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
        "isUserVerified": True, "automaticPresenceSimulation": True}})

    page.goto("/account/security")
    expect(page.get_by_label("Your password").first).to_be_visible()
    # The page the owner loaded before the move asks again instead of failing without a field.
    owner.get_by_role("button", name="Add a passkey").click()
    owner.wait_for_url("**/account/security?done=reauth")
    expect(owner.locator("#passkey-password")).to_be_visible()
    expect(owner.get_by_role("status").first).to_contain_text("enter your password first")
    page.locator("#passkey-password").fill("not the password at all")
    page.get_by_role("button", name="Add a passkey").click()
    expect(page.locator("#passkey-status")).to_have_text("Your password is not right.")
    expect(page.locator(PASSKEY_ROWS)).to_have_count(0)
    page.locator("#passkey-password").fill(PASSWORD)
    page.get_by_role("button", name="Add a passkey").click()
    page.wait_for_url("**/account/security?done=passkey-added")
    expect(page.locator(PASSKEY_ROWS)).to_have_count(1)
    axe_clean(page, "security-reauth")
