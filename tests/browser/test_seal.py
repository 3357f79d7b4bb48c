"""An admin sees the trail sealed and verified, then, after an event is rewritten in Redis behind the
site's back, a plain warning naming it: on the audit page and the dashboard, accessible (axe-core)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis
from playwright.sync_api import expect

from .conftest import AXE_JS, Site, log_in, screenshot_path
from .test_pages import AXE_RUN, BLOCKING

WAIT_S = 15  # a background pass every few seconds on a trail this small


def reload_until(page: Any, path: str, text: str) -> None:
    """Load ``path`` again until it shows ``text`` (the background verifier runs on its own schedule)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        page.goto(path)
        if text in page.locator("#seal-status").inner_text():
            return
        assert time.monotonic() < deadline, f"{path} did not show {text!r} within {WAIT_S} s: " \
                                            f"{page.locator('#seal-status').inner_text()!r}"
        page.wait_for_timeout(300)


def serious_axe_violations(page: Any) -> list[dict[str, Any]]:
    page.evaluate(AXE_JS.read_text())
    return [v for v in page.evaluate(AXE_RUN) if v["impact"] in BLOCKING]


def test_a_rewritten_event_is_named_on_the_admin_pages(start_site: Callable[..., Site],
                                                       new_context: Callable[..., Any]) -> None:
    site = start_site()
    site.create_user("root@example.com", admin=True)
    admin = new_context(site).new_page()
    log_in(admin, "root@example.com")
    reload_until(admin, "/admin/audit", "sealed and verified through")

    # Someone with Redis access rewrites the admin's sign-in: a copy with another address, renamed over the trail.
    client = redis.Redis.from_url(site.redis_url)
    try:
        entries = client.xrange("audit:log")
        victim = next(i for i, f in entries if f[b"t"] == b"login")
        client.delete("audit:copy")
        for ident, fields in entries:
            client.xadd("audit:copy", {**fields, b"i": b"198.51.100.7"} if ident == victim else fields, id=ident)
        client.rename("audit:copy", "audit:log")
    finally:
        client.close()
    victim_id = victim.decode()

    reload_until(admin, "/admin/audit", "not what was sealed")
    warning = admin.get_by_role("alert")
    expect(warning).to_contain_text(f"event {victim_id} was altered")
    expect(warning).to_contain_text("audit verify")
    admin.screenshot(path=screenshot_path("admin-audit-tampered", 1280), full_page=True)
    found = serious_axe_violations(admin)
    assert not found, json.dumps(found, indent=1)

    admin.goto("/admin")
    expect(admin.get_by_role("alert")).to_contain_text(f"event {victim_id} was altered")
    found = serious_axe_violations(admin)
    assert not found, json.dumps(found, indent=1)

    # The warning links to the trail at that event.
    admin.get_by_role("link", name="Show the trail from there").click()
    expect(admin.locator(f"#ev-{victim_id}")).to_be_visible()
    expect(admin.locator(f"#ev-{victim_id}")).to_contain_text("198.51.100.7")
