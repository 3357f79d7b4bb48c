"""Measurement 9: the sealed audit trail (issue 11).

- Rate and lag: a site on its own Redis seals while this process appends events through the site's
  own ``emit`` (1,000 per EVALSHA, pipelined, ids from the real clock) as fast as it can for a few
  seconds. A second connection follows ``audit:seal`` with ``XREAD BLOCK`` and notes when each seal
  arrives. An event's lag is the arrival of the first seal that covers it minus the moment its
  pipeline was sent (so a little more than the truth). Bytes per event: ``MEMORY USAGE audit:seal``
  over the events sealed.
- Scale (on the 1M trail of measurements 5 and 6, see auditscale.py): how long the site takes to seal
  a trail loaded before it started, ``server.py audit verify`` of it (wall time, one process), and the
  site's background pass over it (duration and CPU, from its metrics).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

import common  # also puts site/ on sys.path before sessionaudit is imported
import data
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


class SealRate:
    """Sealing at the fastest append rate this bench produces."""

    def __init__(self, bench: Any):
        self.b = bench
        self.site: Site | None = None

    def close(self) -> None:
        if self.site is not None:
            self.site.close()
            self.site = None

    def run(self) -> dict[str, Any]:
        b = self.b
        duration = b.opts.seal_duration
        server = b.children.redis_server("seal")
        self.site = Site(b.children, "seal", redis_server=server).start()
        client = redis.Redis.from_url(server.url)
        watcher = redis.Redis.from_url(server.url)
        script = client.register_script(keys.LUA_PRELUDE + data.LOADER)
        arrivals: list[tuple[float, tuple[int, int]]] = []
        stop = threading.Event()

        def follow() -> None:
            last = "0-0"
            while not stop.is_set():
                for _, entries in watcher.xread({keys.SEALS: last}, count=100, block=50) or []:
                    now = time.monotonic()
                    for entry_id, _ in entries:
                        arrivals.append((now, idkey(entry_id.decode())))
                        last = entry_id.decode()

        # Ready-made events (the generator cannot keep up with Redis), each sent with the real clock's `now`.
        spec = data.EventSpec(hot_uid=42, users=1000)
        pool = [event[1:] for event in data.generate_events(20_000, int(time.time() * 1000), 1, spec)]
        data.write_users(client, 1000, "x", int(time.time() * 1000))
        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        sent: list[tuple[float, tuple[int, int], int]] = []  # pipeline sent at, last id of a call, events
        log(f"seal: appending for {duration} s as fast as this bench can, the site sealing")
        cpu0 = common.cpu_seconds(self.site.pid)
        b.pinning.pin_self(None)  # as when the large trails are loaded: this process on both cores
        start = time.monotonic()
        k = 0
        while time.monotonic() - start < duration:
            with client.pipeline(transaction=False) as pipe:
                at = time.monotonic()
                now = int(time.time() * 1000)
                for _ in range(4):
                    args: list[object] = [1000]
                    for event in pool[k:k + 1000]:
                        args.append(now)
                        args.extend(event)
                    k = (k + 1000) % len(pool)
                    script(args=args, client=pipe)
                replies = pipe.execute()
                took = time.monotonic() - at
                for n, last in enumerate(replies):  # call n began about n quarters of the pipeline's time in
                    sent.append((at + took * n / len(replies), idkey(last.decode()), 1000))
        appended_s = time.monotonic() - start
        b.pinning.pin_self("load")
        caught_up = wait_sealed(client, 30)
        time.sleep(0.2)  # the follower's last read
        stop.set()
        thread.join(timeout=2)
        site_cpu = common.cpu_seconds(self.site.pid) - cpu0
        total = sum(n for _, _, n in sent)
        lags: list[float] = []
        order = sorted(arrivals, key=lambda a: a[1])
        j = 0
        timeline = []  # (seconds into the run, lag in ms) per call: where the lag comes from
        for at, last, n in sorted(sent, key=lambda s: s[1]):
            while j < len(order) and order[j][1] < last:
                j += 1
            lag = order[j][0] - at if j < len(order) else float("inf")
            lags.extend([lag] * (n // 100))  # one sample per 100 events
            timeline.append((round(at - start, 3), round(lag * 1000)))
        memory = seal_bytes(client)
        client.close()
        watcher.close()
        out = {
            "duration_s": appended_s, "events": total, "append_rate": total / appended_s,
            "lag_p50_ms": (percentile(lags, 50) or 0) * 1000, "lag_p99_ms": (percentile(lags, 99) or 0) * 1000,
            "lag_max_ms": max(lags) * 1000 if lags else None, "caught_up_after_s": caught_up,
            "site_cpu_util": site_cpu / (appended_s + (caught_up or 0)), **memory, "lag_by_call": timeline,
        }
        log(f"seal: {out['append_rate']:,.0f} events/s appended; lag p50 {out['lag_p50_ms']:.0f} ms, p99 "
            f"{out['lag_p99_ms']:.0f} ms, max {out['lag_max_ms']:.0f} ms; {memory['seal_bytes_per_event']:.1f} B/event "
            f"({memory['events_per_seal']:.0f} events a seal); site CPU {out['site_cpu_util']:.0%}")
        return out


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
    done = b.children.run([PY, str(ROOT / "server.py"), "audit", "verify", f"--redis-url={site.url}",
                           f"--data-dir={site.data_dir}", "--log-format=json"], "load", timeout=180,
                          env=site_env(), cwd=str(ROOT))
    cli_s = time.monotonic() - start
    try:
        report = json.loads(done.stdout)["seals"]
    except (ValueError, KeyError):
        raise RuntimeError(f"audit verify printed no report: {done.stdout[-300:]} {done.stderr[-300:]}") from None
    log(f"verify: audit verify of {report['events']:,} events in {cli_s:.1f} s: seals ok={report['ok']}")
    # The site's own pass: the first that finishes after this started ran (at least partly) meanwhile;
    # wait for the next whole one, within the budget.
    m = before
    while time.monotonic() - start < wait:
        m = metrics(metrics_port)
        if m.get("sessionaudit_audit_verify_passes_total", 0.0) >= passes0 + 2:
            break
        time.sleep(0.5)
    whole = m.get("sessionaudit_audit_verify_passes_total", 0.0) >= passes0 + 2
    wall = time.monotonic() - start
    out = {
        "cli_seconds": cli_s, "cli_ok": report["ok"], "cli_events": report["events"], "cli_seals": report["seals"],
        "pass_seconds": m.get("sessionaudit_audit_verify_pass_seconds"),
        "pass_cpu_seconds": m.get("sessionaudit_audit_verify_pass_cpu_seconds"),
        "pass_events": m.get("sessionaudit_audit_verify_pass_events"), "pass_while_idle": whole,
        "site_cpu_util_meanwhile": (common.cpu_seconds(site.pid) - cpu0) / wall,
        "verification_failed": m.get("sessionaudit_audit_verification_failed"),
    }
    log(f"verify: background pass of {out['pass_events'] or 0:,.0f} events: {out['pass_seconds'] or 0:.1f} s, "
        f"CPU {out['pass_cpu_seconds'] or 0:.1f} s{'' if whole else ' (the last one; no whole pass in the time)'}")
    return out


def site_with_metrics(bench: Any, name: str, server: Any) -> tuple[Site, int]:
    port = free_port()
    return Site(bench.children, name, redis_server=server, extra_args=[f"--metrics-port={port}"]), port
