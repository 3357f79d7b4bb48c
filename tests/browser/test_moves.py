"""A session cookie stolen into another browser: the owner sees the mark on /account and ends the
session; an admin sees the dashboard's tile and follows it to the move (axe-core on each page)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from playwright.sync_api import expect

from conftest import UA_FIREFOX, UA_IPHONE

from .conftest import Site, log_in, screenshot_path
from .test_flows import SESSIONS
from .test_seal import serious_axe_violations

MARK = "Used from a new browser since sign-in"


def test_a_stolen_cookie_shows_on_the_account_and_the_dashboard(site: Site,
                                                               new_context: Callable[..., Any]) -> None:
    site.create_user("root@example.com", admin=True)
    site.create_user("dee@example.com")
    laptop_context = new_context(site, user_agent=UA_FIREFOX)
    laptop = laptop_context.new_page()
    phone = new_context(site, user_agent=UA_IPHONE, viewport={"width": 390, "height": 844}).new_page()
    log_in(laptop, "dee@example.com")
    log_in(phone, "dee@example.com")
    phone.goto("/account")
    expect(phone.locator(SESSIONS)).to_have_count(2)
    expect(phone.get_by_text(MARK)).to_have_count(0)

    # The laptop's cookie, copied into another browser (Chromium's own user agent), still works: binding is off.
    thief = new_context(site, storage_state=laptop_context.storage_state()).new_page()
    thief.goto("/account")
    expect(thief).to_have_url(re.compile(r"/account$"))

    # The owner, on the phone, sees which session it was, and ends it.
    phone.reload()
    marked = phone.locator(SESSIONS).filter(has_text=MARK)
    expect(marked).to_have_count(1)
    expect(marked).to_contain_text("Firefox")
    expect(marked).not_to_contain_text("This device")
    phone.screenshot(path=screenshot_path("account-moved", 390), full_page=True)
    assert not serious_axe_violations(phone)
    marked.get_by_role("button", name=re.compile(r"^End session")).click()
    expect(phone).to_have_url(re.compile(r"/account"))
    expect(phone.locator(SESSIONS)).to_have_count(1)
    thief.reload()
    expect(thief).to_have_url(re.compile(r"/login\?next=%2Faccount$"))

    # An admin: the dashboard counts it and links to the session, whose page shows the move.
    admin = new_context(site).new_page()
    log_in(admin, "root@example.com")
    admin.goto("/admin")
    expect(admin.locator("#stat-moved")).to_have_text("1")
    admin.screenshot(path=screenshot_path("admin-dashboard-moved", 1280), full_page=True)
    assert not serious_axe_violations(admin)
    admin.get_by_role("list", name="Sessions that moved (24 hours)").get_by_role("link").click()
    expect(admin).to_have_url(re.compile(r"/admin/sessions/[A-Za-z0-9_-]+$"))
    move = admin.locator("table[aria-labelledby='moves-heading'] tbody tr")
    expect(move).to_have_count(1)
    expect(move).to_contain_text("browser")
    expect(move.locator("td[data-label='From']")).to_contain_text("Firefox")
    expect(move.locator("td[data-label='To']")).to_contain_text("Chrome")
    assert not serious_axe_violations(admin)

    # The tile's link: the trail filtered to moves, this one alone.
    admin.goto("/admin")
    admin.get_by_role("link", name="session that moved in the last 24 hours").click()  # one: singular
    expect(admin).to_have_url(re.compile(r"/admin/audit\?type=session_changed$"))
    rows = admin.locator("tr[id^='ev-']")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("Session moved")
    expect(rows).to_contain_text("dee@example.com")
