"""Browser tests: the real site (`python server.py`) driven by Debian's Chromium through Playwright.

What they need
--------------
- Chromium at ``/usr/bin/chromium``: ``apt-get install -y chromium`` (never ``playwright install``:
  the machine has no network; Playwright only drives the system browser).
- Playwright for Python in the venv: ``playwright>=1.49,<2`` in the ``test`` extra.
- axe-core from npm, pinned by ``package.json``/``package-lock.json`` here:
  ``npm ci --prefix tests/browser`` (``node_modules`` is git-ignored).

When any of the three is missing, every module of this directory is reported as SKIPPED with one
plain reason, and the end of the run says so; nothing errors.

What they do
------------
- ``test_flows.py``: register, account, log out; a wrong password; two devices, one ends the other;
  registering and logging in with the keyboard alone, every focused element showing an outline.
- ``test_follow.py``: an admin following ``/admin/audit`` live sees another browser's sign-in,
  sign-out and (``SESSION_IDLE=3``) expiry appear at the top within 2 s, measured in the page itself.
- ``test_security.py``: an authenticator app set up and used to sign in (codes from pyotp), and
  passkeys added, used and removed through a CDP virtual authenticator (ctap2, internal, resident
  keys, user verification), the site reached as ``http://localhost:<port>`` (its --public-url: browsers
  refuse an IP address as WebAuthn relying party); axe-core on every page of both.
- ``test_moves.py``: a session cookie copied into another browser: its owner sees the mark on
  ``/account`` and ends that session; an admin follows the dashboard's tile to the move.
- ``test_pages.py``: every page at desktop (1280x800) and phone (390x844) widths: a full-page screenshot
  to ``test-artifacts/screenshots/<page>-<width>.png`` at the repository root (git-ignored; CI keeps
  them), no page wider than the window, and axe-core with no "serious" or "critical" violation.

Each test of the first two starts ``python server.py --port=<free> --redis-url=<the test Redis>`` as
a subprocess (cheap argon2 costs from the environment), waits for ``/healthz``, and stops it with
SIGTERM (exit 0 expected); ``test_pages.py`` shares one such site, given a little history, between
its tests. One headless Chromium serves the whole package, with a fresh browser context per test.
Users are created with ``python server.py create-user`` (password on stdin) or through the pages.

Run just these: ``.venv/bin/python -m pytest tests/browser -q``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import process
from conftest import PASSWORD, ROOT
from process import SERVER

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
AXE_JS = HERE / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
EXPECT_TIMEOUT_MS = 5_000


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright for Python (pip install -e '.[test]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium)")
    if not AXE_JS.is_file():
        missing.append("axe-core (npm ci --prefix tests/browser)")
    if not missing:
        return None
    return "browser tests skipped: missing " + "; ".join(missing)


SKIP_REASON = _missing()


class _SkippedModule(pytest.Module):
    """A test module of this directory when the browser stack is missing: skipped, never imported."""

    def collect(self) -> Any:
        pytest.skip(SKIP_REASON or "", allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if SKIP_REASON and module_path.name.startswith("test_"):
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SKIP_REASON:
        terminalreporter.write_line(SKIP_REASON, yellow=True, bold=True)


# --- the site as a subprocess ----------------------------------------------------------------------

class Site(process.Site):
    """``python server.py`` on a free port against a given Redis (see tests/process.py)."""

    def __init__(self, redis_url: str, data_dir: Path, host: str = "127.0.0.1", **env: str):
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.env = process.env(**env)
        super().__init__(data_dir, f"--redis-url={redis_url}", host=host, **env)

    def create_user(self, email: str, *, admin: bool = False, password: str = PASSWORD) -> int:
        """``server.py create-user`` on the same Redis and data dir; returns the new user's id."""
        args = [sys.executable, SERVER, "create-user", f"--email={email}", f"--redis-url={self.redis_url}",
                f"--data-dir={self.data_dir}", *(["--admin"] if admin else [])]
        done = subprocess.run(args, input=password + "\n", capture_output=True, text=True, env=self.env, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        found = re.search(r"user (\d+)", done.stdout)
        assert found, done.stdout
        return int(found.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            return super().stop(sig)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the site did not stop within 20 s of SIGTERM:\n{self.output()}") from None


def stop_site(site: Site) -> None:
    code = site.stop()
    assert code == 0, f"the site exited {code} on SIGTERM:\n{site.output()}"


@pytest.fixture
def start_site(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Site]]:
    """Start the site (environment overrides as keyword arguments); all are stopped after the test."""
    sites: list[Site] = []

    def start(host: str = "127.0.0.1", **env: str) -> Site:
        site = Site(redis_url, tmp_path, host, **env)
        sites.append(site)
        return site

    yield start
    for site in sites:
        stop_site(site)


@pytest.fixture
def site(start_site: Callable[..., Site]) -> Site:
    return start_site()


# --- the browser ---------------------------------------------------------------------------------

@pytest.fixture(scope="package")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the whole browser package."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def new_context(chromium: Any) -> Iterator[Callable[..., Any]]:
    """Make browser contexts (separate cookie jars: separate devices); closed after the test."""
    contexts: list[Any] = []

    def make(site: Site, **kw: Any) -> Any:
        kw.setdefault("viewport", {"width": 1280, "height": 800})
        context = chromium.new_context(base_url=site.url, **kw)
        context.set_default_timeout(10_000)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        with contextlib.suppress(Exception):
            context.close()


# --- what a user does ------------------------------------------------------------------------------

def register(page: Any, email: str, password: str = PASSWORD) -> None:
    page.goto("/register")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_label("Password again").fill(password)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url("**/account")


def log_in(page: Any, email: str, password: str = PASSWORD, *, expect_path: str = "/account") -> None:
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**" + expect_path)


def log_out(page: Any) -> None:
    page.get_by_role("button", name=re.compile(r"^Log out")).click()
    page.wait_for_url(re.compile(r"/$"))


def screenshot_path(name: str, width: int) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}-{width}.png"


def clear_screenshots() -> None:
    if SCREENSHOTS.is_dir():
        shutil.rmtree(SCREENSHOTS)
