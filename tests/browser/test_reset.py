"""A forgotten password, as a person gets through it: from the login page's link to signing in again.

The site runs without an SMTP server, so the mail is read from its outbox, as an operator would.
Every page on the way is checked with axe-core.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
from collections.abc import Callable
from typing import Any

from playwright.sync_api import expect

from process import wait_until

from .conftest import AXE_JS, Site, log_in, screenshot_path
from .test_pages import AXE_RUN, BLOCKING

NEW_PASSWORD = "a brand new passphrase for gail"
LINK = re.compile(r"https?://[^/\s]+(/password/reset/[A-Za-z0-9_-]{43})")


def axe_clean(page: Any, name: str) -> None:
    """No serious or critical axe-core violation; a screenshot of the page is kept as an artifact."""
    page.screenshot(path=screenshot_path(re.sub(r"\W+", "-", name), 1280), full_page=True)
    page.evaluate(AXE_JS.read_text())
    found = [v for v in page.evaluate(AXE_RUN) if v["impact"] in BLOCKING]
    assert not found, f"axe-core on {name}:\n" + json.dumps(found, indent=1)


def mailed_path(site: Site, to: str) -> str:
    """The path of the reset link in the newest mail to ``to`` in the site's outbox."""
    outbox = site.data_dir / "outbox"
    mine: list[Any] = []

    def arrived() -> bool:
        mine[:] = [m for m in (email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
                               for f in sorted(outbox.glob("*.eml"))) if m["To"] == to]
        return bool(mine)

    assert wait_until(arrived, timeout=10), f"no mail to {to} in {outbox}"
    found = LINK.search(mine[-1].get_content())
    assert found, mine[-1].get_content()
    return found.group(1)


def test_a_forgotten_password_from_the_login_page_to_the_account(site: Site,
                                                                 new_context: Callable[..., Any]) -> None:
    site.create_user("gail@example.com")
    page = new_context(site).new_page()
    page.goto("/login")
    page.get_by_role("link", name="Forgot your password?").click()
    expect(page).to_have_url(re.compile(r"/password/forgot$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Forgot your password?")
    axe_clean(page, "forgot")

    page.get_by_label("Email").fill("gail@example.com")
    page.get_by_role("button", name="Send me a link").click()
    expect(page.get_by_role("status")).to_contain_text("a link to choose a new password is on its way")
    axe_clean(page, "forgot, sent")

    path = mailed_path(site, "gail@example.com")
    response = page.goto(path)
    assert response is not None and response.status == 200
    expect(page.get_by_role("heading", level=1)).to_have_text("Choose a new password")
    expect(page.locator("main")).to_contain_text("gail@example.com")
    axe_clean(page, "reset")

    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("New password again").fill("not the same one at all")
    page.get_by_role("button", name="Set new password").click()
    expect(page.get_by_role("alert")).to_have_text("The two passwords do not match.")
    axe_clean(page, "reset, mismatch")

    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("New password again").fill(NEW_PASSWORD)
    page.get_by_role("button", name="Set new password").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    expect(page.get_by_role("status")).to_contain_text("Your password has been changed")
    axe_clean(page, "login after reset")
    log_in(page, "gail@example.com", NEW_PASSWORD)
    expect(page.locator("dl.facts")).to_contain_text("gail@example.com")

    # The link was for one use: now it says so, and offers a new one.
    response = page.goto(path)
    assert response is not None and response.status == 400
    expect(page.get_by_role("heading", level=1)).to_have_text("This link does not work")
    axe_clean(page, "reset, used link")
    page.get_by_role("link", name="Ask for a new link").click()
    expect(page).to_have_url(re.compile(r"/password/forgot$"))
