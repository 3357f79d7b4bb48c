"""Run load from a separate, pinned process: wrk when installed (closed loop), else bench/loadgen.py.

Paced (open-loop) runs, login storms and floods always use loadgen.py: wrk has no fixed-rate mode
and sends the same request every time.
Every run is bounded in time, and the server's CPU time is read from /proc around it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from common import BENCH, PY, UA, Children, cpu_seconds

LOADGEN = str(BENCH / "loadgen.py")
WRK_SCRIPT = str(BENCH / "wrk_report.lua")


class Load:
    def __init__(self, children: Children, use_wrk: bool = True):
        self.children = children
        self.wrk = shutil.which("wrk") if use_wrk else None

    @property
    def tool(self) -> str:
        return "wrk" if self.wrk else "loadgen.py (asyncio)"

    def closed(self, port: int, path: str, conns: int, duration: int, headers: dict[str, str] | None = None,
               expect: int = 200, pid: int | None = None, redis_pid: int | None = None) -> dict[str, Any]:
        """Closed-loop load; with ``pid`` (and ``redis_pid``), also their CPU time per request."""
        hdrs = {"User-Agent": UA, **(headers or {})}
        cpu0 = cpu_seconds(pid) if pid else 0.0
        rcpu0 = cpu_seconds(redis_pid) if redis_pid else 0.0
        if self.wrk:
            args = [self.wrk, "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s", "-s", WRK_SCRIPT]
            for k, v in hdrs.items():
                args += ["-H", f"{k}: {v}"]
            args += [f"http://127.0.0.1:{port}{path}", "--", str(expect)]
            done = self.children.run(args, "load", timeout=duration + 30)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
            if line is None:
                raise RuntimeError(f"wrk printed no report: {done.stdout[-500:]} {done.stderr[-500:]}")
            raw = json.loads(line.removeprefix("WRKJSON "))
            seconds = raw["duration_us"] / 1e6
            result = {
                "requests": raw["requests"], "duration": seconds, "rps": raw["requests"] / seconds,
                "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
                "max_ms": raw["max_us"] / 1000,
                "errors": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
                "bad_status": raw["bad_status"],
            }
        else:
            result = self._loadgen(["closed", f"--port={port}", f"--path={path}", f"--conns={conns}",
                                    f"--duration={duration}", f"--expect={expect}"], hdrs, duration)
        if pid:
            cpu = cpu_seconds(pid) - cpu0
            result["cpu_s"] = cpu
            result["cpu_us_per_req"] = cpu / result["requests"] * 1e6 if result["requests"] else None
        if redis_pid:
            rcpu = cpu_seconds(redis_pid) - rcpu0
            result["redis_cpu_s"] = rcpu
            result["redis_cpu_us_per_req"] = rcpu / result["requests"] * 1e6 if result["requests"] else None
        result["tool"] = "wrk" if self.wrk else "loadgen"
        return result

    def paced(self, port: int, path: str, rate: float, duration: int, conns: int = 32,
              headers: dict[str, str] | None = None, expect: int = 200) -> dict[str, Any]:
        hdrs = {"User-Agent": UA, **(headers or {})}
        return self._loadgen(["paced", f"--port={port}", f"--path={path}", f"--conns={conns}", f"--rate={rate}",
                              f"--duration={duration}", f"--expect={expect}"], hdrs, duration)

    def start_storm(self, port: int, emails: list[str], password: str, clients: int,
                    duration: float) -> subprocess.Popen[str]:
        """Start a login storm; returns once every client holds its XSRF token (READY)."""
        return self._start([PY, LOADGEN, "storm", f"--port={port}", f"--conns={clients}", f"--duration={duration}",
                            f"--emails={','.join(emails)}", f"--password={password}", "--expect=303",
                            "--header", f"User-Agent: {UA}"], "login storm")

    def start_flood(self, port: int, email: str, password: str, conns: int, duration: float) -> subprocess.Popen[str]:
        """Start a flood of refused logins to one account (see loadgen.py flood); returns once READY."""
        return self._start(self._flood_args(port, email, password, conns, duration, 0), "login flood")

    def flood(self, port: int, email: str, password: str, count: int, conns: int = 1,
              timeout: float = 120.0) -> dict[str, Any]:
        """``count`` login attempts to one account, each with a new User-Agent; run to completion."""
        return self._loadgen(self._flood_args(port, email, password, conns, timeout, count)[2:], {}, timeout)

    def finish_storm(self, proc: subprocess.Popen[str], timeout: float, what: str = "login storm") -> dict[str, Any]:
        """The report of a storm or flood started by ``start_storm``/``start_flood``."""
        # Not communicate(): READY was read through the text buffer; the report is one short line.
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.children.stop(proc)
            raise RuntimeError(f"{what} overstayed its time") from None
        out = proc.stdout.read() if proc.stdout else ""
        err = proc.stderr.read() if proc.stderr else ""
        self.children.stop(proc)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"{what} printed no report: {err[-500:]}")
        return json.loads(lines[-1])

    def _start(self, args: list[str], what: str) -> subprocess.Popen[str]:
        proc = self.children.popen(args, "load", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            err = proc.stderr.read() if proc.stderr else ""
            self.children.stop(proc)
            raise RuntimeError(f"{what} did not start: {line!r} {err[-500:]}")
        return proc

    @staticmethod
    def _flood_args(port: int, email: str, password: str, conns: int, duration: float, count: int) -> list[str]:
        return [PY, LOADGEN, "flood", f"--port={port}", f"--conns={conns}", f"--duration={duration}",
                f"--count={count}", f"--emails={email}", f"--password={password}", "--expect=429"]

    def _loadgen(self, args: list[str], headers: dict[str, str], duration: float) -> dict[str, Any]:
        cmd = [PY, LOADGEN, *args]
        for k, v in headers.items():
            cmd += ["--header", f"{k}: {v}"]
        done = self.children.run(cmd, "load", timeout=duration + 60)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-800:]}")
        result = json.loads(lines[-1])
        result["tool"] = "loadgen"
        return result
