"""Run load from a separate, pinned process: wrk when installed (closed loop), else bench/loadgen.py.

Paced (open-loop) runs, login storms and floods always use loadgen.py: wrk has no fixed-rate mode
and sends the same request every time.
Every run is bounded in time, and the server's CPU time is read from /proc around it.
``paced_rounds``: /account paced, calm and during a storm or flood, in interleaved rounds (rows 3, 9).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from common import BENCH, PY, UA, Children, Site, cpu_seconds, log, median, ratio, thread_cpu_seconds, wait_quiet

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


def paced_rounds(b: Any, name: str, site: Site, rate: float, dur: int, headers: dict[str, str],
                 start: Callable[[], subprocess.Popen[str]], what: str,
                 note: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], str],
                 site_cpu: bool = False, cpu_until_report: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """/account paced at ``rate`` for ``dur`` s, calm and while a disturbance runs (``start``: a
    login storm or flood, given a second to get going; its report read by ``finish_storm``), one
    pair a round, calm first in even rounds; ``name`` is the phase of ``b.afford``, the prefix of
    the log lines and the label of the disturbed runs. Each run also gets ``ioloop_cpu_util``, the
    IOLoop (main) thread's share of a core, and with ``site_cpu`` ``site_cpu_util``, the whole
    process's; with ``cpu_until_report`` a disturbed run's share is taken over the paced run and the
    wait for the disturbance's report (as row 3 has always taken it), else over the paced run alone.
    ``note(calm, disturbed, report)`` ends each round's log line.

    Returns the runs and their medians, ``calm``, ``<name>``, ``per_round_ratio`` (p99 disturbed /
    calm), ``p99_ratio``, ``p99_calm_ms``, ``p99_<name>_ms``, ``p50_calm_ms``, ``p50_<name>_ms``,
    ``ioloop_cpu_util_calm``, ``ioloop_cpu_util_<name>`` (and ``site_cpu_util_…``); and the
    disturbance's reports, one a round.
    """
    calm_runs: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    ratios: list[float | None] = []
    for r in range(b.opts.rounds):
        if r and not b.afford(name, 2 * dur + 6, f"{name} round {r + 1}"):
            break
        pair: dict[str, dict[str, Any]] = {}
        for kind in (("calm", name) if r % 2 == 0 else (name, "calm")):
            wait_quiet(site.pid)  # no work left over from a disturbance (queued password hashes)
            proc = None
            if kind != "calm":
                proc = start()
                time.sleep(1.0)  # every client busy before we measure
            main0, cpu0, w0 = (thread_cpu_seconds(site.pid, site.pid), cpu_seconds(site.pid) if site_cpu else 0.0,
                               time.perf_counter())
            res = pair[kind] = b.load.paced(site.port, "/account", rate, dur, headers=headers)
            if proc is not None and cpu_until_report:
                reports.append(b.load.finish_storm(proc, timeout=dur + 60, what=what))
            wall = time.perf_counter() - w0
            res["ioloop_cpu_util"] = (thread_cpu_seconds(site.pid, site.pid) - main0) / wall
            if site_cpu:
                res["site_cpu_util"] = (cpu_seconds(site.pid) - cpu0) / wall
            if proc is not None and not cpu_until_report:
                reports.append(b.load.finish_storm(proc, timeout=dur + 60, what=what))
        calm, dist = pair["calm"], pair[name]
        calm_runs.append(calm)
        runs.append(dist)
        ratios.append(ratio(dist["p99_ms"], calm["p99_ms"]))
        log(f"{name}: round {r + 1}: /account p99 calm {calm['p99_ms']:.1f} ms, {name} {dist['p99_ms']:.1f} ms "
            f"(p50 {calm['p50_ms']:.1f} / {dist['p50_ms']:.1f} ms; {note(calm, dist, reports[-1])}")
        for res in (calm, dist):
            if res["bad_status"] or res["errors"]:
                log(f"{name}: WARNING {res['bad_status']} unexpected statuses, {res['errors']} errors")
    out: dict[str, Any] = {"calm": calm_runs, name: runs, "per_round_ratio": ratios, "p99_ratio": median(ratios)}
    for field in ("p99_ms", "p50_ms", "ioloop_cpu_util", *(["site_cpu_util"] if site_cpu else [])):
        stem, ms, _ = field.partition("_ms")  # p99_ms -> p99_calm_ms; ioloop_cpu_util -> ioloop_cpu_util_calm
        out[f"{stem}_calm{ms}"] = median(x[field] for x in calm_runs)
        out[f"{stem}_{name}{ms}"] = median(x[field] for x in runs)
    return out, reports
