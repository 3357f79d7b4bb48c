"""Running it for months: configuration precedence, access logs without secrets, metrics."""

from __future__ import annotations

import http.cookiejar
import json
import signal
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import PASSWORD
from process import Site, run
from sessionaudit import cli
from sessionaudit.redis_server import free_port


def settings_from(argv: list[str], environ: dict[str, str]):
    return cli.resolve_settings(cli.build_parser().parse_args(argv), environ)


def test_config_precedence_file_then_environment_then_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "site.conf"
    conf.write_text('# comment\nsession_idle = 2\nport = 9001\nredis_url = "redis://example.invalid/1"\n'
                    "xheaders = True\n")
    s = settings_from([f"--config={conf}"], {})
    assert (s.session_idle, s.port, s.redis_url, s.xheaders) == (2, 9001, "redis://example.invalid/1", True)
    s = settings_from([f"--config={conf}"], {"SESSION_IDLE": "5", "PORT": "9002"})
    assert (s.session_idle, s.port) == (5, 9002)
    s = settings_from([f"--config={conf}", "--session-idle=7"], {"SESSION_IDLE": "5"})
    assert (s.session_idle, s.port, s.session_lifetime) == (7, 9001, 43200)
    s = settings_from([], {"CONFIG": str(conf)})
    assert s.session_idle == 2


@pytest.mark.parametrize("text,message", [
    ("sesion_idle = 2\n", "unknown option 'sesion_idle'"),
    ("session_idle = soon\n", "session_idle"),
    ("just words\n", "expected `name = value`"),
])
def test_bad_config_file_stops_the_start(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    r = run(f"--config={conf}")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def scenario(url: str) -> dict[str, str]:
    """Register, fail a login, log in, trip CSRF, log out: return every secret a browser held."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    seen: dict[str, str] = {"password": PASSWORD, "wrong": "wrong password guessed"}
    opener.open(url + "/register").read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    seen["xsrf"] = xsrf

    def post(path: str, **fields: str) -> int:
        data = urllib.parse.urlencode(fields).encode()
        try:
            with opener.open(url + path, data=data) as r:
                return r.status
        except urllib.error.HTTPError as e:
            e.close()
            return e.code

    assert post("/register", email="logs@example.com", password=PASSWORD, password_confirm=PASSWORD,
                _xsrf=xsrf) == 200
    seen["sid"] = next(c.value for c in jar if c.name == "sid")
    seen["sid_inner"] = seen["sid"].split("|")[-2].split(":", 1)[1]
    xsrf = next(c.value for c in jar if c.name == "_xsrf") if any(c.name == "_xsrf" for c in jar) else xsrf
    opener.open(url + "/account").read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    assert post("/logout", _xsrf="forged-token") == 403
    assert post("/logout", _xsrf=xsrf) == 200
    xsrf = next((c.value for c in jar if c.name == "_xsrf"), None) or xsrf
    opener.open(url + "/login").read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    assert post("/login", email="logs@example.com", password=seen["wrong"], _xsrf=xsrf) == 401
    return seen


def test_json_logs_carry_request_ids_and_never_a_secret(tmp_path: Path, redis_url: str) -> None:
    site = Site(tmp_path, f"--redis-url={redis_url}", "--log-format=json", "--debug", "--xheaders")
    try:
        secrets = scenario(site.url)
        req = urllib.request.Request(site.url + "/healthz", headers={"X-Request-Id": "req-from-proxy-42"})
        with urllib.request.urlopen(req) as r:
            assert r.headers["X-Request-Id"] == "req-from-proxy-42"
        with urllib.request.urlopen(site.url + "/") as r:
            generated = r.headers["X-Request-Id"]
        assert generated and generated != "req-from-proxy-42"
    finally:
        assert site.stop(signal.SIGTERM) == 0
    text = site.output()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    access = [r for r in lines if r["logger"] == "sessionaudit.access"]
    assert any(r["request_id"] == "req-from-proxy-42" and r["route"] == "Health" for r in access)
    assert any(r["request_id"] == generated for r in access)
    posts = [r for r in access if r["method"] == "POST"]
    assert {r["status"] for r in posts} >= {303, 403, 401}
    assert all({"request_id", "method", "route", "status", "duration_ms", "user"} <= set(r) for r in access)
    assert any(r["user"] == "1" for r in access)
    warnings = [r["message"] for r in lines if r["level"] == "warning"]
    assert any("CSRF" in m for m in warnings)
    for name, value in secrets.items():
        assert value not in text, f"{name} leaked into the logs"


def test_metrics_count_real_traffic(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    site = Site(tmp_path, f"--redis-url={redis_url}", f"--metrics-port={port}")
    try:
        scenario(site.url)
        with urllib.request.urlopen(site.url + "/account") as r:
            r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            text = r.read().decode()
        with pytest.raises(urllib.error.HTTPError) as not_public:
            urllib.request.urlopen(site.url + "/metrics")
        not_public.value.close()
        assert not_public.value.code == 404  # metrics are not on the public port
    finally:
        site.stop()
    assert 'sessionaudit_http_requests_total{method="POST",route="Register",status="303"} 1.0' in text
    assert 'sessionaudit_logins_total{result="failed"} 1.0' in text
    assert "sessionaudit_http_request_duration_seconds_bucket" in text
    assert "sessionaudit_live_sessions 0.0" in text
    assert "sessionaudit_sweeper_runs_total" in text
    assert "sessionaudit_argon2_seconds_count 2.0" in text  # the registration's hash, the failed login's verify
    assert 'sessionaudit_audit_events_total{type="login_failed"} 1.0' in text


def test_commands_print_json_with_log_format_json(redis_url: str, tmp_path: Path) -> None:
    made = run("create-user", "--email=j@example.com", f"--redis-url={redis_url}", "--log-format=json",
               stdin=PASSWORD + "\n")
    assert made.returncode == 0
    assert json.loads(made.stdout) == {"message": "created user 1 (not admin)", "created_user": "1", "admin": False}
    verify = run("audit", "verify", f"--redis-url={redis_url}", f"--data-dir={tmp_path}", "--log-format=json")
    summary = json.loads(verify.stdout)
    assert summary["ok"] is True and summary["by_type"] == {"register": 1}
    bad = run("create-user", "--email=j@example.com", f"--redis-url={redis_url}", "--log-format=json",
              stdin=PASSWORD + "\n")
    assert bad.returncode == 2 and "already exists" in json.loads(bad.stderr)["message"]
