"""Measurements 5, 6, the audit half of 8 and 9: /admin/audit on a small and a large trail, the
ndjson export of the large one, Redis memory per audit event, and the seals.

Two sites, each on its own Redis: one with ``events_small`` events, one with ``events_large``,
bulk-loaded through the site's own ``emit`` (pipelined EVALSHA, 1,000 events a call) while the site
runs and seals them (sealing.py). Users are written directly (no `register` events), then an admin
is created with ``server.py create-user`` and logs in through POST /login.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

import data
import redis
import sealing
from common import (
    PASSWORD,
    UA,
    Site,
    browser_cookie,
    cpu_seconds,
    log,
    login,
    median,
    memory_kib,
    ratio,
    request,
    reset_peak_rss,
)

from sessionaudit import keys

ADMIN_EMAIL = "audit.admin@example.com"
USERS = 1000
HOT_UID = 42


class AuditScale:
    def __init__(self, bench: Any):
        self.b = bench
        self.sites: dict[str, Site] = {}
        self.cookies: dict[str, str] = {}
        self.load_info: dict[str, dict[str, Any]] = {}
        self.hot_email = data.email_of(HOT_UID)
        self.metrics_port = 0

    def start(self) -> None:
        b = self.b
        password_hash = data.default_hasher().hash(PASSWORD)
        end_ms = int(time.time() * 1000) - 60_000
        for name, n in (("small", b.opts.events_small), ("large", b.opts.events_large)):
            server = b.children.redis_server(f"audit-{name}")
            client = redis.Redis.from_url(server.url)
            data.write_users(client, USERS, password_hash, end_ms - n * 2500)
            # The site runs while the trail is loaded: it seals as the events come, at the fastest
            # rate this bench appends (row 9), as it would in production.
            site, port = sealing.site_with_metrics(b, f"audit-{name}", server)
            site.start()
            before = client.info("memory")["used_memory"]
            log(f"audit: loading {n:,} events into the {name} trail, its site sealing them")
            watcher = sealing.SealWatcher(server.url)
            calls: list[tuple[float, str, int]] = []
            b.pinning.pin_self(None)  # generate on the other core while Redis works
            started = time.monotonic()
            try:
                seconds = data.load_events(client, n, data.EventSpec(hot_uid=HOT_UID, users=USERS), end_ms,
                                           calls=calls)
            finally:
                b.pinning.pin_self("load")
            caught_up = sealing.wait_sealed(client, 120)
            watcher.stop()
            if caught_up is None:
                raise RuntimeError(f"the {name} site did not seal its trail within 2 minutes of the load")
            after = client.info("memory")["used_memory"]
            length = client.xlen(keys.AUDIT)
            seals = sealing.seal_bytes(client)
            events_bytes = after - before - seals["seal_bytes"]
            self.load_info[name] = {"events": n, "stream_length": length, "load_s": seconds,
                                    "load_events_per_s": n / seconds, "used_memory_delta": after - before,
                                    "bytes_per_event": events_bytes / n, "sealed_after_load_s": caught_up,
                                    **seals, **sealing.seal_lag(calls, watcher.arrivals, started)}
            info = self.load_info[name]
            log(f"audit: {name}: {n / seconds:,.0f} events/s, {events_bytes / n:.0f} B/event and "
                f"{seals['seal_bytes_per_event']:.1f} B/event of seals; seal lag p50 {info['lag_p50_ms']:.0f} ms, "
                f"p99 {info['lag_p99_ms']:.0f} ms, max {info['lag_max_ms']:.0f} ms; all sealed {caught_up:.1f} s "
                "after the load")
            if name == "large":
                self.metrics_port = port
            client.close()
            site.create_user_cli(ADMIN_EMAIL, admin=True)
            sid, _ = login(site.port, ADMIN_EMAIL)
            self.cookies[name] = browser_cookie(site.port, "/admin/audit", sid)
            self.sites[name] = site

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        self.sites.clear()

    # -- 5. audit page at scale ---------------------------------------------------------------

    def pages(self) -> dict[str, Any]:
        b = self.b
        paths = {"first": "/admin/audit", "user": "/admin/audit?" + urllib.parse.urlencode({"user": self.hot_email})}
        rows: dict[str, int] = {}
        for size, site in self.sites.items():
            for page, path in paths.items():
                resp = request(site.port, "GET", path, headers={"Cookie": self.cookies[size]})
                if resp.status != 200:
                    raise RuntimeError(f"{size} {path} answered {resp.status}: {resp.body[:300]!r}")
                rows[f"{size}/{page}"] = resp.body.count(b'<tr id="ev-')
                b.load.closed(site.port, path, 8, 1, {"Cookie": self.cookies[size]})  # warm-up
        log(f"audit: rows per page {rows}")
        configs = [(size, page) for page in paths for size in ("small", "large")]
        runs: dict[str, list[dict[str, Any]]] = {f"{s}/{p}": [] for s, p in configs}
        per_round: list[dict[str, float | None]] = []
        for r in range(b.opts.rounds):
            if r and not b.afford("audit", 4 * (b.opts.audit_duration + 1.5), f"audit page round {r + 1}"):
                break
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            this = {}
            for size, page in order:
                site = self.sites[size]
                res = b.load.closed(site.port, paths[page], 8, b.opts.audit_duration,
                                    {"Cookie": self.cookies[size]}, pid=site.pid, redis_pid=site.redis_pid)
                if res["bad_status"] or res["errors"]:
                    log(f"audit: WARNING {size}/{page}: {res['bad_status']} bad statuses, {res['errors']} errors")
                this[f"{size}/{page}"] = res
                runs[f"{size}/{page}"].append(res)
            per_round.append({
                f"{page}_time_ratio": ratio(this[f"small/{page}"]["rps"], this[f"large/{page}"]["rps"])
                for page in paths} | {
                f"{page}_cpu_ratio": ratio(_total_cpu(this[f"large/{page}"]), _total_cpu(this[f"small/{page}"]))
                for page in paths})
            log(f"audit: round {r + 1}: " + ", ".join(f"{k} {v['rps']:.0f} req/s" for k, v in this.items()))
        summary = {k: {"rps": median(x["rps"] for x in v), "p50_ms": median(x["p50_ms"] for x in v),
                       "cpu_us_per_req": median(x.get("cpu_us_per_req") for x in v),
                       "redis_cpu_us_per_req": median(x.get("redis_cpu_us_per_req") for x in v),
                       "bad_status": sum(x["bad_status"] for x in v)} for k, v in runs.items()}
        return {
            "events": {s: self.load_info[s]["events"] for s in self.sites}, "user": self.hot_email,
            "rows": rows, "connections": 8, "runs": runs, "per_round": per_round, "summary": summary,
            "first_ratio": median(p["first_time_ratio"] for p in per_round),
            "user_ratio": median(p["user_time_ratio"] for p in per_round),
            "first_cpu_ratio": median(p["first_cpu_ratio"] for p in per_round),
            "user_cpu_ratio": median(p["user_cpu_ratio"] for p in per_round),
        }

    # -- 9. audit verify and a background pass at scale -------------------------------------------

    def verify(self) -> dict[str, Any]:
        b = self.b
        wait = max(20.0, min(150.0, b.spare("verify") - 5))
        return sealing.verify_at_scale(b, self.sites["large"], self.metrics_port, wait)

    # -- 6. export ---------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        b = self.b
        site = self.sites["large"]
        runs: list[dict[str, Any]] = []
        baselines: list[dict[str, Any]] = []
        planned = b.opts.export_runs
        for r in range(planned):
            bound = min(b.opts.export_timeout, b.spare("export") - 12)
            if r and bound < 30:
                b.trimmed.append(f"export run {r + 1}")
                break
            bound = max(20.0, bound)
            steps = ("baseline", "site") if r % 2 == 0 else ("site", "baseline")
            for step in steps:
                if step == "baseline":
                    b.pinning.pin_self("server")  # the same core as the site; it is idle meanwhile
                    try:
                        baselines.append(raw_export(site.url, min(10.0, bound)))
                    finally:
                        b.pinning.pin_self("load")
                    log(f"export: baseline (XREVRANGE + json.dumps in one process): "
                        f"{baselines[-1]['events_per_s']:,.0f} events/s")
                else:
                    runs.append(http_export(site, self.cookies["large"], bound))
                    x = runs[-1]
                    note = " (PARTIAL: time bound hit)" if x["partial"] else ""
                    log(f"export: site: {x['events']:,} events in {x['seconds']:.1f} s = {x['events_per_s']:,.0f}/s, "
                        f"RSS growth {x['rss_growth_mib']:.1f} MiB{note}")
            if runs and runs[-1]["seconds"] > 40 and r + 1 < planned:
                log("export: one run took over 40 s: skipping the other runs to stay within the time budget")
                break
        return {
            "events_in_trail": self.load_info["large"]["stream_length"], "runs": runs, "baselines": baselines,
            "events_per_s": median(x["events_per_s"] for x in runs),
            "baseline_events_per_s": median(x["events_per_s"] for x in baselines),
            "ratio_to_baseline": median(ratio(x["events_per_s"], y["events_per_s"]) for x, y in zip(runs, baselines,
                                                                                                  strict=False)),
            "rss_growth_mib": median(x["rss_growth_mib"] for x in runs),
            "server_cpu_util": median(x["server_cpu_util"] for x in runs),
            "redis_cpu_util": median(x["redis_cpu_util"] for x in runs),
            "partial": any(x["partial"] for x in runs),
        }


def _total_cpu(run: dict[str, Any]) -> float | None:
    """CPU per request of the site and its Redis together: what a page costs wherever it runs."""
    if run.get("cpu_us_per_req") is None or run.get("redis_cpu_us_per_req") is None:
        return None
    return run["cpu_us_per_req"] + run["redis_cpu_us_per_req"]


def http_export(site: Site, cookie: str, timeout: float) -> dict[str, Any]:
    """Stream /admin/audit.ndjson; count events; the server's RSS growth from /proc."""
    pid = site.pid
    redis_pid = site.redis_server.process.pid if site.redis_server.process else None
    cpu0, rcpu0 = cpu_seconds(pid), cpu_seconds(redis_pid) if redis_pid else 0.0
    hwm_reset = reset_peak_rss(pid)
    rss0 = memory_kib(pid)["VmRSS"]
    peak_seen = rss0
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=60)
    lines = 0
    nbytes = 0
    partial = False
    start = time.perf_counter()
    last_sample = start
    try:
        conn.request("GET", "/admin/audit.ndjson", headers={"Cookie": cookie, "User-Agent": UA})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"export answered {resp.status}")
        while True:
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            lines += chunk.count(b"\n")
            nbytes += len(chunk)
            now = time.perf_counter()
            if now - last_sample > 0.25:
                peak_seen = max(peak_seen, memory_kib(pid)["VmRSS"])
                last_sample = now
            if now - start > timeout:
                partial = True
                break
    finally:
        conn.close()
    seconds = time.perf_counter() - start
    server_cpu = cpu_seconds(pid) - cpu0
    redis_cpu = cpu_seconds(redis_pid) - rcpu0 if redis_pid else None
    mem = memory_kib(pid)
    peak = max(peak_seen, mem["VmHWM"] if hwm_reset else mem["VmRSS"])
    return {"events": lines, "bytes": nbytes, "seconds": seconds, "events_per_s": lines / seconds,
            "rss_before_kib": rss0, "rss_peak_kib": peak, "rss_after_kib": mem["VmRSS"],
            "rss_growth_mib": (peak - rss0) / 1024, "hwm_reset": hwm_reset, "partial": partial,
            "server_cpu_util": server_cpu / seconds, "redis_cpu_util": redis_cpu / seconds if redis_cpu else None,
            "events_per_server_cpu_s": lines / server_cpu if server_cpu else None}


def raw_export(url: str, timeout: float) -> dict[str, Any]:
    """What an export costs without the site: XREVRANGE in chunks of 1,000 and one json.dumps each
    (bounded in time: its steady rate is what counts)."""
    client = redis.Redis.from_url(url)
    count = 0
    start = time.perf_counter()
    cursor = "+"
    partial = False
    try:
        while True:
            entries = client.xrevrange(keys.AUDIT, cursor, "-", count=1000)
            if not entries:
                break
            out = []
            for entry_id, fields in entries:
                row = {"id": entry_id.decode(), **{k.decode(): v.decode() or None for k, v in fields.items()}}
                out.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            "".join(out)
            count += len(entries)
            cursor = "(" + entries[-1][0].decode()
            if time.perf_counter() - start > timeout:
                partial = True
                break
    finally:
        client.close()
    seconds = time.perf_counter() - start
    return {"events": count, "seconds": seconds, "events_per_s": count / seconds, "partial": partial}
