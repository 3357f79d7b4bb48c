"""What a user sees: register, account, log out; a wrong password; two devices; the keyboard alone."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from playwright.sync_api import expect

from conftest import PASSWORD

from .conftest import Site, log_in, log_out, register

SESSIONS = "table[aria-labelledby='sessions-heading'] tbody tr"


def test_register_see_the_account_then_log_out(site: Site, new_context: Callable[..., Any]) -> None:
    page = new_context(site).new_page()
    page.goto("/")
    page.get_by_role("link", name="Create an account").click()
    expect(page).to_have_url(re.compile(r"/register$"))
    register(page, "ada@example.com")

    expect(page).to_have_url(re.compile(r"/account$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Your account")
    expect(page.locator("dl.facts")).to_contain_text("ada@example.com")
    sessions = page.locator(SESSIONS)
    expect(sessions).to_have_count(1)
    expect(sessions.first).to_contain_text("This device")

    log_out(page)
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Session Audit")
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Log in")).to_be_visible()
    page.goto("/account")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Faccount$"))


def test_a_wrong_password_shows_the_message_and_stays_on_login(site: Site, new_context: Callable[..., Any]) -> None:
    site.create_user("bob@example.com")
    page = new_context(site).new_page()
    page.goto("/login")
    page.get_by_label("Email").fill("bob@example.com")
    page.get_by_label("Password").fill("not the password at all")
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as answer:
        page.get_by_role("button", name="Log in").click()
    assert answer.value.status == 401

    alert = page.get_by_role("alert")
    expect(alert).to_have_text("That email and password do not match an account.")
    expect(page).to_have_url(re.compile(r"/login$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Log in")
    expect(page.get_by_label("Email")).to_have_value("bob@example.com")
    expect(page.get_by_label("Email")).to_have_attribute("aria-describedby", "form-error")
    expect(page.get_by_label("Password")).to_have_value("")

    # An unknown email gets the very same message (no hint about which accounts exist).
    page.get_by_label("Email").fill("nobody@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as answer:
        page.get_by_role("button", name="Log in").click()
    assert answer.value.status == 401
    page.wait_for_load_state()
    expect(page.get_by_label("Email")).to_have_value("nobody@example.com")
    expect(page.get_by_role("alert")).to_have_text("That email and password do not match an account.")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/account")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Faccount$"))


def test_two_devices_one_ends_the_other(site: Site, new_context: Callable[..., Any]) -> None:
    site.create_user("cy@example.com")
    laptop = new_context(site).new_page()
    phone = new_context(site, viewport={"width": 390, "height": 844}).new_page()
    log_in(laptop, "cy@example.com")
    log_in(phone, "cy@example.com")

    for page in (laptop, phone):
        page.goto("/account")
        sessions = page.locator(SESSIONS)
        expect(sessions).to_have_count(2)
        expect(sessions.filter(has_text="This device")).to_have_count(1)
        expect(page.get_by_role("button", name=re.compile(r"^End session"))).to_have_count(1)

    laptop.get_by_role("button", name=re.compile(r"^End session")).click()
    expect(laptop).to_have_url(re.compile(r"/account"))
    expect(laptop.locator(SESSIONS)).to_have_count(1)
    expect(laptop.locator(SESSIONS).first).to_contain_text("This device")

    phone.reload()
    expect(phone).to_have_url(re.compile(r"/login\?next=%2Faccount$"))
    expect(phone.get_by_role("heading", level=1)).to_have_text("Log in")
    laptop.reload()
    expect(laptop).to_have_url(re.compile(r"/account$"))


FOCUS_STYLE = """() => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const s = getComputedStyle(el);
  return {id: el.id, tag: el.tagName, text: (el.textContent || "").trim().slice(0, 40),
          outline: s.outlineStyle, width: parseFloat(s.outlineWidth), shadow: s.boxShadow};
}"""


def tab_to(page: Any, predicate: Callable[[dict[str, Any]], bool], what: str, limit: int = 20) -> dict[str, Any]:
    """Press Tab until the focused element matches; every element on the way must show its focus."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(FOCUS_STYLE)
        assert focused is not None, "Tab left the page"
        assert focused["outline"] != "none" and focused["width"] > 0, f"no visible focus on {focused}"
        if predicate(focused):
            return focused
    raise AssertionError(f"Tab never reached {what}")


def test_forms_work_with_the_keyboard_alone(site: Site, new_context: Callable[..., Any]) -> None:
    page = new_context(site).new_page()
    page.goto("/")
    skip = tab_to(page, lambda f: True, "the first element")
    assert skip["text"] == "Skip to content", skip
    expect(page.get_by_role("link", name="Skip to content")).to_be_in_viewport()

    tab_to(page, lambda f: f["tag"] == "A" and f["text"] == "Register", "the Register link")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/register$"))
    expect(page.get_by_label("Email")).to_be_focused()  # autofocus
    page.keyboard.type("kay@example.com")
    tab_to(page, lambda f: f["id"] == "password", "the password")
    page.keyboard.type(PASSWORD)
    tab_to(page, lambda f: f["id"] == "password_confirm", "the confirmation")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/account$"))
    expect(page.locator("dl.facts")).to_contain_text("kay@example.com")

    tab_to(page, lambda f: f["tag"] == "BUTTON" and f["text"].startswith("Log out"), "Log out")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/$"))

    tab_to(page, lambda f: f["tag"] == "A" and f["text"] == "Log in", "the Log in link")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/login$"))
    expect(page.get_by_label("Email")).to_be_focused()
    page.keyboard.type("kay@example.com")
    tab_to(page, lambda f: f["id"] == "password", "the password")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/account$"))
    expect(page.locator(SESSIONS).filter(has_text="This device")).to_have_count(1)
