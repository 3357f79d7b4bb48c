"""Measurement 9: the sealed audit trail (issue 11).

- Rate and lag: the large trail of measurements 5 and 6 (auditscale.py) is loaded while its site
  runs and seals it: the loader appends through the site's own ``emit`` as fast as this bench can
  (1,000 events per EVALSHA, 4 a pipeline). A second connection follows ``audit:seal`` with ``XREAD
  BLOCK`` and notes when each seal arrives. An event's lag is the arrival of the first seal that
  covers it minus when its call began (about: a pipeline's time is shared out among its calls).
  Bytes per event: ``MEMORY USAGE audit:seal`` over the events sealed.
- Scale: ``server.py audit verify`` of that trail (wall time, one process), and the site's
  background pass over it (duration and CPU, from its metrics).
"""

from __future__ import annotations

import json
import resource
import threading
import time
import urllib.request
from typing import Any

import common  # also puts site/ on sys.path before sessionaudit is imported
import redis
from common import PY, ROOT, Site, log, percentile, site_env

from sessionaudit import keys
from sessionaudit.redis_server import free_port
from sessionaudit.seal import Seal, idkey


def wait_sealed(client: redis.Redis, timeout: float) -> float | None:
    """Seconds until the newest seal covers the newest event (None: not within ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        newest = client.xrevrange(keys.AUDIT, count=1)
        top = client.xrevrange(keys.SEALS, count=1)
        if not newest or (top and idkey(top[0][0].decode()) >= idkey(newest[0][0].decode())):
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def seal_bytes(client: redis.Redis) -> dict[str, float]:
    """Redis memory of the seals (MEMORY USAGE, every node counted) per event they cover."""
    top = client.xrevrange(keys.SEALS, count=1)
    sealed = Seal.from_entry(*top[0]).total if top else 0
    used = client.memory_usage(keys.SEALS, samples=0) or 0
    count = client.xlen(keys.SEALS)
    return {"seal_bytes": used, "seals": count, "events_sealed": sealed,
            "seal_bytes_per_event": used / sealed if sealed else 0.0,
            "events_per_seal": sealed / count if count else 0.0}


class SealWatcher:
    """Follows ``audit:seal`` on a connection of its own (``XREAD BLOCK``) and notes when each seal arrives."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.arrivals: list[tuple[float, tuple[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        last = "0-0"
        while not self._stop.is_set():
            for _, entries in self.client.xread({keys.SEALS: last}, count=100, block=50) or []:
                now = time.monotonic()
                for entry_id, _ in entries:
                    self.arrivals.append((now, idkey(entry_id.decode())))
                    last = entry_id.decode()

    def stop(self) -> None:
        time.sleep(0.2)  # its last read
        self._stop.set()
        self._thread.join(timeout=2)
        self.client.close()


def seal_lag(calls: list[tuple[float, str, int]], arrivals: list[tuple[float, tuple[int, int]]],
             started: float) -> dict[str, Any]:
    """Per event: when the first seal covering it arrived minus when its call began (one sample per 100)."""
    order = sorted(arrivals, key=lambda a: a[1])
    lags: list[float] = []
    timeline = []  # (seconds into the load, lag ms) per call
    j = 0
    for at, last, n in sorted(calls, key=lambda c: idkey(c[1])):
        key = idkey(last)
        while j < len(order) and order[j][1] < key:
            j += 1
        lag = order[j][0] - at if j < len(order) else float("inf")
        lags.extend([lag] * max(1, n // 100))
        timeline.append((round(at - started, 2), round(lag * 1000)))
    return {"lag_p50_ms": (percentile(lags, 50) or 0) * 1000, "lag_p99_ms": (percentile(lags, 99) or 0) * 1000,
            "lag_max_ms": max(lags) * 1000 if lags else None, "lag_by_call": timeline[::10]}


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("sessionaudit_audit_")}


def verify_at_scale(bench: Any, site: Site, metrics_port: int, wait: float) -> dict[str, Any]:
    """``server.py audit verify`` of the site's trail, and the site's next background pass over it."""
    b = bench
    before = metrics(metrics_port)
    passes0 = before.get("sessionaudit_audit_verify_passes_total", 0.0)
    cpu0 = common.cpu_seconds(site.pid)
    start = time.monotonic()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = b.children.run([PY, str(ROOT / "server.py"), "audit", "verify", f"--redis-url={site.url}",
                           f"--data-dir={site.data_dir}", "--log-format=json"], "load", timeout=180,
                          env=site_env(), cwd=str(ROOT))
    cli_s = time.monotonic() - start
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    try:
        report = json.loads(done.stdout)["seals"]
    except (ValueError, KeyError):
        raise RuntimeError(f"audit verify printed no report: {done.stdout[-300:]} {done.stderr[-300:]}") from None
    log(f"verify: audit verify of {report['events']:,} events in {cli_s:.1f} s (CPU {cli_cpu:.1f} s): "
        f"seals ok={report['ok']}")
    # The site's own pass over the whole trail, one that began after this section did, so that it ran
    # with nothing else in the site (its CPU is then its own); within the time left, else the last one.
    m = before
    samples = [(start, cpu0)]  # the site's CPU (/proc) as time goes, for the pass's own window
    while time.monotonic() - start < wait:
        m = metrics(metrics_port)
        samples.append((time.monotonic(), common.cpu_seconds(site.pid)))
        if m.get("sessionaudit_audit_verify_passes_total", 0.0) > passes0 \
                and (m.get("sessionaudit_audit_verify_pass_events") or 0) >= report["events"] \
                and (m.get("sessionaudit_audit_verify_pass_seconds") or 1e9) <= time.monotonic() - start:
            break
        time.sleep(0.5)
    wall = time.monotonic() - start
    whole = (m.get("sessionaudit_audit_verify_pass_seconds") or 1e9) <= wall  # it began in this section
    pass_s = m.get("sessionaudit_audit_verify_pass_seconds") or 0.0
    began = samples[-1][0] - pass_s
    at_start = next((c for t, c in reversed(samples) if t <= began), cpu0)
    process_cpu = samples[-1][1] - at_start if whole else None
    out = {
        "cli_seconds": cli_s, "cli_cpu_seconds": cli_cpu, "cli_ok": report["ok"], "cli_events": report["events"],
        "cli_seals": report["seals"],
        "pass_seconds": m.get("sessionaudit_audit_verify_pass_seconds"),
        "pass_cpu_seconds": m.get("sessionaudit_audit_verify_pass_cpu_seconds"),
        "pass_events": m.get("sessionaudit_audit_verify_pass_events"), "pass_while_idle": whole,
        "pass_process_cpu_seconds": process_cpu,
        "site_cpu_util_meanwhile": (common.cpu_seconds(site.pid) - cpu0) / wall,
        "verification_failed": m.get("sessionaudit_audit_verification_failed"),
    }
    log(f"verify: background pass of {out['pass_events'] or 0:,.0f} events: {out['pass_seconds'] or 0:.1f} s, "
        f"IOLoop CPU {out['pass_cpu_seconds'] or 0:.1f} s, the site's CPU meanwhile (/proc) "
        f"{process_cpu if process_cpu is not None else float('nan'):.1f} s"
        f"{'' if whole else ' (it began before this section)'}")
    return out


def site_with_metrics(bench: Any, name: str, server: Any) -> tuple[Site, int]:
    port = free_port()
    return Site(bench.children, name, redis_server=server, extra_args=[f"--metrics-port={port}"]), port
