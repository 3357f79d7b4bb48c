"""The real command line: `python server.py` as a subprocess, embedded Redis, create-user, signals."""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORD
from process import SERVER, Site, alive, env, redis_pid, run, wait_until
from sessionaudit.redis_server import free_port


def test_create_user_and_serve_on_the_embedded_redis(tmp_path: Path) -> None:
    made = run("create-user", "--email=Admin@Example.com", "--admin", f"--data-dir={tmp_path}", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert "created user 1" in made.stdout
    taken = run("create-user", "--email=admin@example.com", f"--data-dir={tmp_path}", stdin=PASSWORD + "\n")
    assert taken.returncode != 0 and "already exists" in taken.stderr
    weak = run("create-user", "--email=other@example.com", f"--data-dir={tmp_path}", stdin="password123\n")
    assert weak.returncode != 0 and "weak password" in weak.stderr
    aof = tmp_path / "redis"
    assert (aof / "appendonly.aof").exists() or (aof / "appendonlydir").is_dir()  # Redis 6 / Redis 7

    site = Site(tmp_path)
    sock = tmp_path / "redis" / "redis.sock"
    assert sock.exists()
    pid = redis_pid(tmp_path)
    assert pid and alive(pid)
    # The account persisted (AOF) across the two Redis starts: logging in works.
    import http.cookiejar
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(site.url + "/login").read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    body = urllib.parse.urlencode({"email": "admin@example.com", "password": PASSWORD, "_xsrf": xsrf}).encode()
    page = opener.open(site.url + "/login", data=body)
    assert page.geturl().endswith("/account") and b"admin@example.com" in page.read()

    assert site.stop(signal.SIGTERM) == 0
    assert wait_until(lambda: not alive(pid))
    out = site.output()
    assert "stopped" in out
    assert "no admin account yet" not in out  # there is one


def test_crashed_site_leaves_no_orphan_redis(tmp_path: Path) -> None:
    site = Site(tmp_path)
    pid = redis_pid(tmp_path)
    assert pid and alive(pid)
    site.stop(signal.SIGKILL)  # no chance to clean up
    assert wait_until(lambda: not alive(pid)), "redis-server outlived the site"
    again = Site(tmp_path)  # and the next start works
    assert again.stop(signal.SIGINT) == 0


def test_two_sites_on_one_data_dir_are_refused(tmp_path: Path) -> None:
    site = Site(tmp_path)
    try:
        second = subprocess.run([sys.executable, SERVER, f"--port={free_port()}", f"--data-dir={tmp_path}"],
                                env=env(), capture_output=True, text=True, timeout=30)
        assert second.returncode == 2
        assert "in use by another running site" in second.stderr
    finally:
        site.stop()


def test_redis_url_from_environment(tmp_path: Path, redis_url: str) -> None:
    made = run("create-user", "--email=env@example.com", stdin=PASSWORD + "\n", REDIS_URL=redis_url)
    assert made.returncode == 0, made.stderr
    verify = run("audit", "verify", f"--redis-url={redis_url}", f"--data-dir={tmp_path}")  # not ./var's seal copy
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "register: 1" in verify.stdout


def test_help_lists_every_option_with_default_and_environment() -> None:
    out = run("--help").stdout
    for option, env_name in (("--redis-url", "REDIS_URL"), ("--session-idle", "SESSION_IDLE"),
                             ("--session-lifetime", "SESSION_LIFETIME"), ("--xheaders", "XHEADERS"),
                             ("--audit-retention-days", "AUDIT_RETENTION_DAYS"), ("--config", "CONFIG")):
        assert option in out and f"[{env_name}]" in out
    assert "default: 1800" in out


@pytest.mark.parametrize("args,message", [
    (["--session-idle=soon"], "--session-idle: expected a whole number"),
    (["--port=99999"], "port"),
    (["--log-format=xml"], "--log-format must be"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_bad_options_stop_with_a_clear_message(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_warns_about_a_redis_that_would_lose_data(tmp_path: Path) -> None:
    from sessionaudit.redis_server import RedisServer
    with RedisServer.ephemeral(tmp_path, extra=["--maxmemory-policy", "allkeys-lru"]) as shared:
        site = Site(tmp_path, f"--redis-url={shared.url}")
        assert site.stop() == 0
        out = site.output()
    assert "maxmemory-policy is 'allkeys-lru', not 'noeviction'" in out
    assert "persistence is off" in out


class Visitor:
    """A browser for subprocess tests: a cookie jar (cookies go to every port of 127.0.0.1) and the XSRF field."""

    def __init__(self) -> None:
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, url: str) -> tuple[int, str, str]:
        """(status, final URL, body) after redirects."""
        try:
            with self.opener.open(url, timeout=10) as r:
                return r.status, r.geturl(), r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, url, e.read().decode()

    def post(self, url: str, fields: dict[str, str]) -> tuple[int, str, str]:
        if not any(c.name == "_xsrf" for c in self.jar):
            self.get(url.rsplit("/", 1)[0] + "/login")
        xsrf = next(c.value for c in self.jar if c.name == "_xsrf")
        body = urllib.parse.urlencode({**fields, "_xsrf": xsrf}).encode()
        try:
            with self.opener.open(url, data=body, timeout=10) as r:
                return r.status, r.geturl(), r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, url, e.read().decode()


def test_commands_work_beside_a_running_site(tmp_path: Path) -> None:
    site = Site(tmp_path)  # the embedded Redis, on this data dir
    try:
        assert wait_until(lambda: "no admin account yet" in site.log.read_text())
        assert "create-user --email=you@example.com --admin --data-dir=" in site.log.read_text()
        made = run("create-user", "--email=boss@example.com", "--admin", f"--data-dir={tmp_path}",
                   stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
        linked = run("reset-password", "--email=Boss@Example.com", f"--data-dir={tmp_path}",
                     PUBLIC_URL=site.url)
        assert linked.returncode == 0, linked.stderr
        link = linked.stdout.strip()
        assert link.startswith(site.url + "/password/reset/") and len(link.rsplit("/", 1)[1]) == 43
        visitor = Visitor()
        status, _, body = visitor.get(link)
        assert status == 200 and "boss@example.com" in body
        new_password = "another long passphrase entirely"
        status, final, body = visitor.post(link, {"password": new_password, "password_confirm": new_password})
        assert status == 200 and final == site.url + "/login" and "Your password has been changed" in body
        status, final, _ = visitor.post(site.url + "/login", {"email": "boss@example.com", "password": new_password})
        assert final == site.url + "/account"
        unknown = run("reset-password", "--email=nobody@example.com", f"--data-dir={tmp_path}")
        assert unknown.returncode == 2 and "no account with nobody@example.com" in unknown.stderr
        verified = run("audit", "verify", f"--data-dir={tmp_path}")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "password_reset_requested: 1" in verified.stdout and "password_changed: 1" in verified.stdout
        # Still only one site per data dir.
        second = subprocess.run([sys.executable, SERVER, f"--port={free_port()}", f"--data-dir={tmp_path}"],
                                env=env(), capture_output=True, text=True, timeout=30)
        assert second.returncode == 2 and "in use by another running site" in second.stderr
    finally:
        assert site.stop() == 0
    # With the site gone, a command starts (and stops) the embedded Redis itself, as before.
    again = run("reset-password", "--email=boss@example.com", f"--data-dir={tmp_path}", "--log-format=json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["link"].startswith("http://127.0.0.1:8888/password/reset/")
    assert wait_until(lambda: not alive(redis_pid(tmp_path) or 0))


def account_status(site: Site, sid: str) -> int:
    """The status of GET /account with this session cookie (200, or 302 to the login page)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=10)
    try:
        conn.request("GET", "/account", headers={"Cookie": f"sid={sid}"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_processes_sharing_only_cookie_secret_share_sessions(tmp_path: Path, redis_url: str) -> None:
    """Two processes, one Redis, different data dirs: COOKIE_SECRET is all they need to share."""
    secret = "one-secret-shared-by-every-process-0123"
    dirs = [tmp_path / name for name in ("a", "b", "legacy")]
    for d in dirs:
        d.mkdir()
    (dirs[2] / "session_secret").write_text("what an earlier version generated\n")  # an upgraded install
    sites = [Site(d, f"--redis-url={redis_url}", COOKIE_SECRET=secret) for d in dirs]
    try:
        a, b, legacy = sites
        visitor = Visitor()
        _, final, _ = visitor.post(a.url + "/register", {"email": "ann@example.com", "password": PASSWORD,
                                                              "password_confirm": PASSWORD})
        assert final == a.url + "/account"
        sid = next(c.value for c in visitor.jar if c.name == "sid")
        assert account_status(a, sid) == account_status(b, sid) == 200  # B knows A's session
        # The legacy file still names sessions its own way (so an upgrade logs no one out), and says so.
        assert account_status(legacy, sid) == 302
        assert "sessions are named with the secret from" in legacy.log.read_text()
        assert "sessions are named with" not in a.log.read_text()
        # Logging out on B ends the session for A too.
        visitor.post(b.url + "/logout", {})
        assert account_status(a, sid) == 302
    finally:
        for site in sites:
            assert site.stop() == 0


def _login(url: str, email: str) -> Any:
    """An opener logged in through the login form (cookies kept)."""
    import http.cookiejar
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(url + "/login").read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    body = urllib.parse.urlencode({"email": email, "password": PASSWORD, "_xsrf": xsrf}).encode()
    opener.open(url + "/login", data=body).read()
    return opener


def test_seals_survive_restarts_and_audit_verify_checks_them(tmp_path: Path, redis_url: str) -> None:
    """The real site seals, logs the newest seal and keeps it in --data-dir; after a restart it goes on
    from there; `audit verify` (text and JSON, and --file for an export) passes, then names what changed."""
    import json

    import redis as sync_redis
    secret = {"COOKIE_SECRET": "cli-test-cookie-secret-0123456789"}
    copy = tmp_path / "audit-seal.json"

    def recorded() -> int:
        try:
            return json.loads(copy.read_text())["events"]
        except (OSError, ValueError):
            return 0

    def add_user(email: str) -> None:
        made = run("create-user", f"--email={email}", "--admin", f"--redis-url={redis_url}",
                   f"--data-dir={tmp_path}", stdin=PASSWORD + "\n", **secret)
        assert made.returncode == 0, made.stderr

    add_user("a@example.com")
    site = Site(tmp_path, f"--redis-url={redis_url}", **secret)
    assert wait_until(lambda: recorded() == 1, 10)
    opener = _login(site.url, "a@example.com")  # a login event
    assert wait_until(lambda: recorded() == 2, 10)
    export = opener.open(site.url + "/admin/audit.ndjson?seals=1").read()
    assert site.stop() == 0
    assert "audit sealed through" in site.output()
    again = Site(tmp_path, f"--redis-url={redis_url}", **secret)
    add_user("b@example.com")
    assert wait_until(lambda: recorded() == 3, 10)
    assert again.stop() == 0
    assert "continuing after seal" in again.output()

    verify = run("audit", "verify", f"--redis-url={redis_url}", f"--data-dir={tmp_path}", **secret)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "sealed and verified through" in verify.stdout and "3 event(s) checked against 3 seal(s)" in verify.stdout
    as_json = run("audit", "verify", f"--redis-url={redis_url}", f"--data-dir={tmp_path}", "--log-format=json",
                  **secret)
    summary = json.loads(as_json.stdout)
    assert summary["ok"] is True and summary["seals"]["verified_through"]["events"] == 3

    # The export made before the restart, checked offline; then one line changed.
    exported = tmp_path / "audit.ndjson"
    exported.write_bytes(export)
    offline = run("audit", "verify", f"--file={exported}", **secret)
    assert offline.returncode == 0 and "every event in the file is what was sealed" in offline.stdout
    login_id = json.loads(export.splitlines()[2])["id"]
    exported.write_bytes(export.replace(b'"type":"login"', b'"type":"logout"'))
    offline = run("audit", "verify", f"--file={exported}", "--log-format=json", **secret)
    assert offline.returncode == 1
    problems = json.loads(offline.stdout)["problems"]
    assert [(p["kind"], p["event"], p["message"]) for p in problems] == [
        ("altered", login_id, f"event {login_id} was altered: it does not match its seal")]
    keyless = tmp_path / "no-key"
    keyless.mkdir()
    assert run("audit", "verify", f"--file={exported}", f"--data-dir={keyless}").returncode == 2  # no key: usage

    # Cut off the newest event together with its seal: only the copy outside Redis can tell.
    client = sync_redis.Redis.from_url(redis_url)
    try:
        newest = client.xrevrange("audit:log", count=1)[0][0]
        entries = client.xrange("audit:log")[:-1]
        for ident, fields in entries:
            client.xadd("audit:copy", fields, id=ident)
        client.rename("audit:copy", "audit:log")
        client.xdel("audit:seal", newest)
    finally:
        client.close()
    verify = run("audit", "verify", f"--redis-url={redis_url}", f"--data-dir={tmp_path}", **secret)
    assert verify.returncode == 1
    assert f"FAILED: the trail is shorter than the copy outside Redis ({copy}) says: it records seal " \
           f"{newest.decode()} (3 events" in verify.stdout


def test_hashing_threads_default_to_the_cores_the_process_may_use() -> None:
    """Pinned to one core (taskset, a cgroup cpuset), the site hashes on one thread: a second would
    only share that core with the IOLoop, and thrash its caches with another 64 MiB."""
    code = ("import os; from sessionaudit.config import Settings; "
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(Settings().hash_threads)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "site")})
    assert out.stdout.strip() == "1"
