"""Every page at desktop and phone widths: a full-page screenshot kept as an artifact, and axe-core."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import expect

from conftest import PASSWORD, UA_FIREFOX, UA_IPHONE

from .conftest import AXE_JS, Site, clear_screenshots, log_in, log_out, register, screenshot_path, stop_site

WIDTHS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
# page name: (path, who looks at it); {user} and {session} are filled in from the site's own links.
PAGES = {
    "home": ("/", "anonymous"),
    "login": ("/login", "anonymous"),
    "register": ("/register", "anonymous"),
    "forgot": ("/password/forgot", "anonymous"),
    "account": ("/account", "admin"),
    "password": ("/account/password", "admin"),
    "security": ("/account/security", "admin"),
    "admin-dashboard": ("/admin", "admin"),
    "admin-audit": ("/admin/audit", "admin"),
    "admin-sessions": ("/admin/sessions", "admin"),
    "admin-user": ("/admin/users/{user}", "admin"),
    "admin-session": ("/admin/sessions/{session}", "admin"),
    "not-found": ("/no-such-page", "admin"),
}
BLOCKING = ("serious", "critical")
SIDEWAYS = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"


@dataclasses.dataclass
class Tour:
    site: Site
    admin_state: Path
    user: int
    session: str

    def path(self, name: str) -> str:
        return PAGES[name][0].format(user=self.user, session=self.session)

    def page(self, new_context: Any, name: str) -> Any:
        """A fresh context for this page, logged in as the admin when the page needs it."""
        state = self.admin_state if PAGES[name][1] == "admin" else None
        return new_context(self.site, storage_state=state).new_page()

    def visit(self, page: Any, name: str, width: str) -> None:
        page.set_viewport_size(WIDTHS[width])
        response = page.goto(self.path(name))
        assert response is not None
        assert response.status == (404 if name == "not-found" else 200), f"{name}: {response.status}"
        expect(page.get_by_role("heading", level=1)).to_be_visible()


@pytest.fixture(scope="module")
def tour(redis_server: Any, chromium: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tour]:
    """One site with a little history: registrations, failures, a logout, sessions on three devices."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    clear_screenshots()
    data = tmp_path_factory.mktemp("pages")
    site = Site(redis_server.url, data)
    try:
        site.create_user("admin@example.com", admin=True)
        phone = chromium.new_context(base_url=site.url, user_agent=UA_IPHONE, viewport=WIDTHS["phone"])
        laptop = chromium.new_context(base_url=site.url, user_agent=UA_FIREFOX)
        admin = chromium.new_context(base_url=site.url)
        try:
            page = phone.new_page()
            register(page, "grace.hopper@example.com")
            log_out(page)
            page.goto("/login")
            page.get_by_label("Email").fill("grace.hopper@example.com")
            page.get_by_label("Password").fill("wrong password, twice over")
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("alert")).to_be_visible()
            log_in(page, "grace.hopper@example.com")

            other = laptop.new_page()
            register(other, "a.rather.long.address.for.layout@subdomain.example.org")
            other.goto("/login")
            other.get_by_label("Email").fill("nobody@example.com")
            other.get_by_label("Password").fill(PASSWORD)
            other.get_by_role("button", name="Log in").click()
            expect(other.get_by_role("alert")).to_be_visible()

            mine = admin.new_page()
            log_in(mine, "admin@example.com")
            state = data / "admin-state.json"
            admin.storage_state(path=state)
            mine.goto("/admin/sessions?user=grace.hopper%40example.com")
            user_link = mine.get_by_role("link", name="grace.hopper@example.com").first
            user = int(re.sub(r".*/", "", user_link.get_attribute("href") or ""))
            mine.goto(f"/admin/users/{user}")
            session_link = mine.locator("ol.span-list a.mono").last  # the first, ended session
            session = re.sub(r".*/", "", session_link.get_attribute("href") or "")
        finally:
            for context in (phone, laptop, admin):
                context.close()
        yield Tour(site, state, user, session)
    finally:
        stop_site(site)


@pytest.mark.parametrize("name", PAGES)
def test_screenshots(tour: Tour, new_context: Any, name: str) -> None:
    page = tour.page(new_context, name)
    sideways = []
    for width in WIDTHS:
        tour.visit(page, name, width)
        page.screenshot(path=screenshot_path(name, WIDTHS[width]["width"]), full_page=True)
        overflow = page.evaluate(SIDEWAYS)
        if overflow > 0:
            sideways.append(f"{width}: {overflow}px")
    assert not sideways, f"the {name} page is wider than the window at " + ", ".join(sideways)


AXE_RUN = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.map(n => ({target: n.target.join(" "), summary: n.failureSummary}))}));
}"""


@pytest.fixture(scope="module")
def axe_source() -> str:
    return AXE_JS.read_text()


@pytest.mark.parametrize("name", PAGES)
def test_axe_finds_nothing_serious(tour: Tour, new_context: Any, axe_source: str, name: str) -> None:
    page = tour.page(new_context, name)
    found = []
    for width in WIDTHS:
        tour.visit(page, name, width)
        page.evaluate(axe_source)  # Runtime.evaluate: not subject to the page's script-src CSP
        for violation in page.evaluate(AXE_RUN):
            if violation["impact"] in BLOCKING:
                found.append({"width": width, **violation})
    assert not found, f"axe-core on {name}:\n" + json.dumps(found, indent=1)
