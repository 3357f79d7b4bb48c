"""Measurements 1-4: the authenticated page against the floor and a plain handler, Redis work per
page, /account latency during a login storm, and the cost of a login against one argon2 verify.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from typing import Any

import data
import redis
import tornado.web
from common import (
    BENCH,
    COOKIE_SECRET,
    PASSWORD,
    PY,
    UA,
    Site,
    browser_cookie,
    commandstats,
    log,
    login,
    median,
    percentile,
    ratio,
    request,
    wait_http,
    wait_quiet,
    xsrf_token,
)
from load import paced_rounds

from sessionaudit.redis_server import free_port

ACCOUNT_EMAIL = "account.owner@example.com"
LOGIN_EMAIL = "login.timing@example.com"
STORM_CLIENTS = 8


class Web:
    """The main site (with its own Redis), the floor (with its own Redis) and the plain handler."""

    def __init__(self, bench: Any):
        self.b = bench
        self.site: Site | None = None
        self.floor_proc: Any = None
        self.hello_proc: Any = None
        self.floor_port = 0
        self.hello_port = 0
        self.floor_redis: Any = None
        self.cookie = ""
        self.floor_cookie = ""
        self.storm_emails = [f"storm.{i}@example.com" for i in range(STORM_CLIENTS)]
        self.account_rps: float | None = None

    # -- setup ---------------------------------------------------------------------------------

    def start(self) -> None:
        b = self.b
        log("pages: starting the site, the floor and the plain handler")
        self.site = Site(b.children, "main").start()
        log(f"pages: creating {ACCOUNT_EMAIL} with `server.py create-user` (default argon2 costs)")
        self.site.create_user_cli(ACCOUNT_EMAIL)
        password_hash = data.default_hasher().hash(PASSWORD)
        data.register_users(self.site.redis, [LOGIN_EMAIL, *self.storm_emails], password_hash)
        sid, _ = login(self.site.port, ACCOUNT_EMAIL)
        self.cookie = browser_cookie(self.site.port, "/account", sid)

        self.floor_redis = b.children.redis_server("floor")
        self.floor_port = free_port()
        self.floor_proc = b.children.popen(
            [PY, str(BENCH / "floor.py"), "floor", f"--port={self.floor_port}", f"--redis-url={self.floor_redis.url}"],
            "server", env=b.env)
        self.hello_port = free_port()
        self.hello_proc = b.children.popen([PY, str(BENCH / "floor.py"), "hello", f"--port={self.hello_port}"],
                                           "server", env=b.env)
        wait_http(self.hello_port, "/hello", proc=self.hello_proc)
        session_id = "floor-" + "x" * 40
        client = redis.Redis.from_url(self.floor_redis.url)
        client.set("floor:s:" + session_id, json.dumps({
            "uid": "1", "email": ACCOUNT_EMAIL, "created": "2026-11-28 16:35:50 UTC", "ip": "127.0.0.1", "ua": UA}),
            ex=1800)
        client.close()
        self.floor_cookie = tornado.web.create_signed_value(COOKIE_SECRET, "sid", session_id, version=2).decode()
        deadline = time.monotonic() + 20
        while True:
            try:
                resp = request(self.floor_port, "GET", "/floor", headers={"Cookie": f"sid={self.floor_cookie}"})
                if resp.status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the floor server did not answer")
            time.sleep(0.1)

    def targets(self) -> dict[str, tuple[int, str, dict[str, str], int, int | None]]:
        assert self.site is not None
        floor_redis = self.floor_redis.process.pid if self.floor_redis.process else None
        return {
            "site": (self.site.port, "/account", {"Cookie": self.cookie}, self.site.pid, self.site.redis_pid),
            "floor": (self.floor_port, "/floor", {"Cookie": f"sid={self.floor_cookie}"}, self.floor_proc.pid,
                      floor_redis),
            "hello": (self.hello_port, "/hello", {}, self.hello_proc.pid, None),
            "home": (self.site.port, "/", {}, self.site.pid, self.site.redis_pid),  # the anonymous page
        }

    def stop_baselines(self) -> None:
        for proc in (self.floor_proc, self.hello_proc):
            if proc is not None:
                self.b.children.stop(proc)
        if self.floor_redis is not None:
            self.b.children.stop_redis(self.floor_redis)
        self.floor_proc = self.hello_proc = self.floor_redis = None

    def close(self) -> None:
        self.stop_baselines()
        if self.site is not None:
            self.site.close()
            self.site = None

    # -- 1. authenticated page ---------------------------------------------------------------

    def pages(self) -> dict[str, Any]:
        b = self.b
        targets = self.targets()
        sizes = {}
        for name, (port, path, headers, _, _) in targets.items():
            resp = request(port, "GET", path, headers=headers)
            if resp.status != 200:
                raise RuntimeError(f"{name} {path} answered {resp.status}")
            sizes[name] = len(resp.body)
        log(f"pages: body sizes {sizes}; warming up")
        for port, path, headers, _, _ in targets.values():
            b.load.closed(port, path, 32, 1, headers)
        order = list(targets)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
        per_round: list[dict[str, float | None]] = []
        for r in range(b.opts.rounds):
            if r and not b.afford("pages", 4 * (b.opts.duration + 1.5), f"page round {r + 1}"):
                break
            names = order[r % len(order):] + order[:r % len(order)]
            this: dict[str, dict[str, Any]] = {}
            for name in names:
                port, path, headers, pid, redis_pid = targets[name]
                res = b.load.closed(port, path, 32, b.opts.duration, headers, pid=pid, redis_pid=redis_pid)
                if res["bad_status"] or res["errors"]:
                    log(f"pages: WARNING {name}: {res['bad_status']} unexpected statuses, {res['errors']} errors")
                this[name] = res
                runs[name].append(res)
            site, floor, hello, home = this["site"], this["floor"], this["hello"], this["home"]
            per_round.append({
                "site_over_floor": ratio(site["rps"], floor["rps"]),
                "home_over_hello": ratio(home["rps"], hello["rps"]),
                "home_over_hello_by_cpu": ratio(hello.get("cpu_us_per_req"), home.get("cpu_us_per_req")),
                "redis_cpu_over_floor": ratio(site.get("redis_cpu_us_per_req"), floor.get("redis_cpu_us_per_req")),
                "site_over_floor_by_cpu": ratio(floor.get("cpu_us_per_req"), site.get("cpu_us_per_req")),
                "site_cpu_above_plain_us": _diff(site.get("cpu_us_per_req"), hello.get("cpu_us_per_req")),
                "floor_cpu_above_plain_us": _diff(floor.get("cpu_us_per_req"), hello.get("cpu_us_per_req")),
            })
            log(f"pages: round {r + 1}: " + ", ".join(
                f"{n} {this[n]['rps']:.0f} req/s {this[n].get('cpu_us_per_req') or 0:.0f} us/req" for n in names))
        summary = {name: {
            "rps": median(x["rps"] for x in runs[name]),
            "p50_ms": median(x["p50_ms"] for x in runs[name]),
            "p99_ms": median(x["p99_ms"] for x in runs[name]),
            "cpu_us_per_req": median(x.get("cpu_us_per_req") for x in runs[name]),
            "redis_cpu_us_per_req": median(x.get("redis_cpu_us_per_req") for x in runs[name]),
            "server_cpu_util": median(x["cpu_s"] / x["duration"] for x in runs[name] if x.get("cpu_s") is not None),
            "bad_status": sum(x["bad_status"] for x in runs[name]),
            "errors": sum(x["errors"] for x in runs[name]),
        } for name in order}
        self.account_rps = summary["site"]["rps"]
        return {
            "connections": 32, "tool": b.load.tool, "body_bytes": sizes, "runs": runs, "per_round": per_round,
            "summary": summary,
            "site_over_floor": median(p["site_over_floor"] for p in per_round),
            "home_over_hello": median(p["home_over_hello"] for p in per_round),
            "home_over_hello_by_cpu": median(p["home_over_hello_by_cpu"] for p in per_round),
            "redis_cpu_over_floor": median(p["redis_cpu_over_floor"] for p in per_round),
            "site_over_floor_by_cpu": median(p["site_over_floor_by_cpu"] for p in per_round),
            "site_cpu_above_plain_us": median(p["site_cpu_above_plain_us"] for p in per_round),
            "floor_cpu_above_plain_us": median(p["floor_cpu_above_plain_us"] for p in per_round),
        }

    # -- 2. Redis work per page ----------------------------------------------------------------

    def redis_work(self) -> dict[str, Any]:
        """Commands and round trips per page. The site is restarted (same Redis, same secrets, so
        the cookie stays valid) with its sweeper ticking once an hour, so that its once-a-second
        EVALSHA does not blur the counts; what background remains is measured and subtracted."""
        assert self.site is not None
        site = self.site
        site.stop()
        site.extra_args = ["--sweep-interval=3600"]
        try:
            site.start()
            time.sleep(0.5)  # the sweeper's first run (at start) is over
            return self._redis_work(site)
        finally:
            site.stop()
            site.extra_args = []
            site.start()

    def _redis_work(self, site: Site) -> dict[str, Any]:
        n = self.b.opts.redis_requests
        out: dict[str, Any] = {"requests": n, "sweep_interval_s": 3600}
        with Monitor(site.redis_server.url) as mon:
            # Background (the sweeper): rates per second, subtracted from each window below.
            idle_s = 10.0  # the site's background work (sealing, checking seals) comes in rounds: a longer look
            before, mark = commandstats(site.redis), mon.mark()
            time.sleep(idle_s)
            bg_calls = _delta(before, commandstats(site.redis))
            bg_top = mon.since(mark)
            out["background_per_s"] = {"commands": sum(bg_calls.values()) / idle_s, "round_trips": bg_top / idle_s}
            pages = {"authenticated": ("/account", {"Cookie": self.cookie}),
                     "anonymous": ("/", {}), "anonymous_login_form": ("/login", {})}
            for name, (path, headers) in pages.items():
                before, mark = commandstats(site.redis), mon.mark()
                start = time.perf_counter()
                statuses = _sequential(site.port, path, headers, n)
                elapsed = time.perf_counter() - start
                time.sleep(0.2)  # let MONITOR's reader catch up
                calls = _delta(before, commandstats(site.redis))
                top = mon.since(mark)
                background = elapsed + 0.2
                total = sum(calls.values()) - out["background_per_s"]["commands"] * background
                trips = top - out["background_per_s"]["round_trips"] * background
                out[name] = {
                    "path": path, "statuses": statuses,
                    "commands_per_page": max(0.0, total / n), "round_trips_per_page": max(0.0, trips / n),
                    "by_command": {k: round(v / n, 3) for k, v in sorted(calls.items()) if v},
                }
        return out

    # -- 3. login storm ------------------------------------------------------------------------

    def storm(self) -> dict[str, Any]:
        assert self.site is not None
        b = self.b
        site = self.site
        rate = round(min(400.0, max(50.0, 0.25 * (self.account_rps or 400.0))))
        dur = b.opts.storm_duration
        headers = {"Cookie": self.cookie}
        log(f"storm: /account paced at {rate} req/s, {STORM_CLIENTS} clients logging in (default argon2 costs)")
        b.load.paced(site.port, "/account", rate, 2, headers=headers)  # warm-up

        def note(calm: dict[str, Any], storm: dict[str, Any], s: dict[str, Any]) -> str:
            return (f"IOLoop thread {calm['ioloop_cpu_util']:.0%} / {storm['ioloop_cpu_util']:.0%} of a core); "
                    f"{s['requests']} logins ({s['rate_steady']:.2f}/s, p50 {s['p50_ms'] or 0:.0f} ms)")

        rounds, logins = paced_rounds(
            b, "storm", site, rate, dur, headers, what="login storm", note=note, cpu_until_report=True,
            start=lambda: b.load.start_storm(site.port, self.storm_emails, PASSWORD, STORM_CLIENTS, dur + 2))
        return {
            "rate": rate, "duration": dur, "clients": STORM_CLIENTS, **rounds, "logins": logins,
            "max_storm_ms": median(x["max_ms"] for x in rounds["storm"]),
            "login_rate": median(x["rate_steady"] for x in logins),
            "login_p50_under_storm_ms": median(x["p50_ms"] for x in logins),
            "login_failures": sum(x["bad_status"] + x["errors"] for x in logins),
        }

    # -- 4. login --------------------------------------------------------------------------------

    def login_cost(self, storm: dict[str, Any] | None) -> dict[str, Any]:
        """p50 of one client's POST /login against one in-process verify on the server's core, and
        the login rate of 8 clients (no page load meanwhile) against cores / verify time."""
        assert self.site is not None
        b = self.b
        hasher = data.default_hasher()
        stored = hasher.hash(PASSWORD)
        k = b.opts.login_samples
        verify_s: list[float] = []
        login_s: list[float] = []
        per_round: list[float | None] = []
        rates: list[dict[str, Any]] = []
        dur = b.opts.storm_duration
        xsrf = xsrf_token(self.site.port)
        login(self.site.port, LOGIN_EMAIL, xsrf=xsrf)  # warm-up
        for r in range(b.opts.rounds):
            if r and not b.afford("login", k * 0.8 + dur + 3, f"login round {r + 1}"):
                break
            # One verify in this process, on the server's core (the server is idle meanwhile).
            b.pinning.pin_self("server")
            try:
                rv = []
                for _ in range(k):
                    t0 = time.perf_counter()
                    hasher.verify(stored, PASSWORD)
                    rv.append(time.perf_counter() - t0)
            finally:
                b.pinning.pin_self("load")
            rl = [login(self.site.port, LOGIN_EMAIL, xsrf=xsrf)[1] for _ in range(k)]
            wait_quiet(self.site.pid)
            proc = b.load.start_storm(self.site.port, self.storm_emails, PASSWORD, STORM_CLIENTS, dur)
            rates.append(b.load.finish_storm(proc, timeout=dur + 60))
            wait_quiet(self.site.pid)
            verify_s += rv
            login_s += rl
            per_round.append(ratio(statistics.median(rl), statistics.median(rv)))
        verify_p50 = statistics.median(verify_s)
        cores = b.pinning.server_cores()
        ideal = cores / verify_p50
        rate = median(x["rate_steady"] for x in rates)
        return {
            "storm_runs": rates, "rate_during_page_load": storm["login_rate"] if storm else None,
            "samples_per_round": k, "verify_s": verify_s, "login_s": login_s, "per_round_ratio": per_round,
            "verify_p50_ms": verify_p50 * 1000, "login_p50_ms": statistics.median(login_s) * 1000,
            "login_p90_ms": (percentile(login_s, 90) or 0) * 1000, "ratio": median(per_round),
            "server_cores": cores, "ideal_rate": ideal, "storm_rate": rate, "rate_ratio": ratio(rate, ideal),
        }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}


def _sequential(port: int, path: str, headers: dict[str, str], n: int) -> dict[str, int]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses: dict[str, int] = {}
    try:
        for _ in range(n):
            conn.request("GET", path, headers={"User-Agent": UA, **headers})
            resp = conn.getresponse()
            resp.read()
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
    finally:
        conn.close()
    return statuses


class Monitor:
    """Counts top-level commands (round trips) with MONITOR: commands run by a script show as
    ``[db lua]`` and are not round trips; EVALSHA itself is one. A pipeline would count once per
    command (the site's pages use none)."""

    def __init__(self, url: str):
        host, port = url.split("//", 1)[1].split("/")[0].split(":")
        self.addr = (host, int(port))
        self.top = 0
        self._stop = False
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Monitor:
        self._sock = socket.create_connection(self.addr)
        self._sock.sendall(b"MONITOR\r\n")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        if self._sock:
            self._sock.close()

    def mark(self) -> int:
        with self._lock:
            return self.top

    def since(self, mark: int) -> int:
        with self._lock:
            return self.top - mark

    def _read(self) -> None:
        assert self._sock is not None
        buf = b""
        while not self._stop:
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                if not line.startswith(b"+") or b"]" not in line:
                    continue
                close = line.index(b"]")
                client = line[line.index(b"[") + 1:close]
                if client.endswith(b" lua") or line[close + 2:close + 8].lower() == b'"info"':
                    continue  # run by a script, or the bench's own INFO
                with self._lock:
                    self.top += 1
