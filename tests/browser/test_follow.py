"""An admin following the audit trail live sees another browser's login, logout and expiry within 2 s."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from playwright.sync_api import expect

from .conftest import Site, log_in, log_out

WITHIN_MS = 2_000
IDLE = 3

# Record, in the admin's page, the wall-clock time each row is added (the server's clock: same machine)
# and whether it went in at the top.
WATCH_ROWS = """() => {
  window.__notReloaded = true;
  window.__arrived = {};
  window.__atTop = {};
  new MutationObserver(records => {
    for (const r of records) for (const n of r.addedNodes)
      if (n.nodeType === 1 && n.id) {
        window.__arrived[n.id] = Date.now();
        window.__atTop[n.id] = n === n.parentNode.firstElementChild;
      }
  }).observe(document.getElementById("live-rows"), {childList: true});
}"""


def epoch_ms(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


def arrived_late_by(admin: Any, row: Any) -> float:
    """Milliseconds between the event's time (its `at`) and its row appearing, at the top, in the admin's page."""
    row_id = row.get_attribute("id")
    at = row.locator("time").get_attribute("datetime")
    arrived = admin.evaluate("id => window.__arrived[id]", row_id)
    assert arrived, f"row {row_id} was not added live"
    assert admin.evaluate("id => window.__atTop[id]", row_id), f"row {row_id} was not added at the top"
    return arrived - epoch_ms(at)


def test_following_the_trail_shows_login_logout_and_expiry_live(
        start_site: Callable[..., Site], new_context: Callable[..., Any]) -> None:
    site = start_site(SESSION_IDLE=str(IDLE))
    site.create_user("root@example.com", admin=True)
    site.create_user("dee@example.com")

    admin = new_context(site).new_page()
    log_in(admin, "root@example.com")
    admin.goto("/admin/audit")
    follow = admin.get_by_role("button", name="Follow live")
    expect(follow).to_be_visible()
    follow.click()
    expect(admin.locator("#follow-toggle")).to_have_attribute("aria-pressed", "true")
    expect(admin.locator("#follow-status")).to_contain_text("Following")
    admin.evaluate(WATCH_ROWS)
    rows = admin.locator("#live-rows > tr")
    before = rows.count()

    def user_rows(label: str) -> Any:
        """The user's rows with this event label, newest first (the admin's own expiry comes in between)."""
        return rows.filter(has=admin.locator(".ev", has_text=label)).filter(has_text="dee@example.com")

    def newest(label: str, count: int = 1, timeout: float = WITHIN_MS) -> Any:
        expect(user_rows(label)).to_have_count(count, timeout=timeout)
        return user_rows(label).first

    # Sign in from another browser. The admin stays idle too: with SESSION_IDLE=3 its own session
    # ends as well, but its stream (already authorised) keeps going, and its own expiry is another row.
    user = new_context(site).new_page()
    log_in(user, "dee@example.com")
    signed_in = newest("Signed in")
    assert arrived_late_by(admin, signed_in) <= WITHIN_MS

    log_out(user)
    signed_out = newest("Signed out")
    assert arrived_late_by(admin, signed_out) <= WITHIN_MS
    ref = signed_in.locator("a.mono").get_attribute("title")
    assert ref and signed_out.locator("a.mono").get_attribute("title") == ref

    # Sign in again and do nothing: the session expires IDLE seconds after its last request
    # (the /account page the login redirected to), and the row must follow within 2 s of that deadline.
    log_in(user, "dee@example.com")
    deadline = time.monotonic() + IDLE  # no later than the real deadline: the response came after it was set
    assert arrived_late_by(admin, newest("Signed in", 2)) <= WITHIN_MS
    remaining_ms = (deadline - time.monotonic()) * 1000 + WITHIN_MS
    expired = newest("Expired", timeout=max(remaining_ms, 1))
    assert arrived_late_by(admin, expired) <= WITHIN_MS
    expect(expired).to_contain_text("idle")

    assert admin.evaluate("window.__notReloaded") is True, "the admin's page was reloaded"
    assert rows.count() >= before + 4
    expect(admin.locator("#follow-toggle")).to_have_attribute("aria-pressed", "true")
    user.reload()
    expect(user).to_have_url(re.compile(r"/login\?next=%2Faccount$"))
