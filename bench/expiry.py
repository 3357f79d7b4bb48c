"""Measurement 7 and the session half of 8: expiry lag with many live sessions, and Redis memory
per live session.

Sessions are created through the site's LOGIN script (pipelined EVALSHA), with deadlines placed
by the ``idle`` argument. First ``sessions - burst`` long-lived ones, before the site starts:
``used_memory`` is read before and after, then the audit keys are deleted and it is read again,
which splits the growth into the sessions' state and their `login` events. Then the site starts
(with its sweeper), and for each burst ``burst`` more sessions are created whose deadlines fall in
one and the same second, a few seconds ahead. Every `expired` event of the burst is then read back:
lag = its stream id's time minus its ``at`` (the deadline).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import data
import redis
import sealing
from common import PASSWORD, Site, log, median, percentile

from sessionaudit import keys

USERS = 1000


class Expiry:
    def __init__(self, bench: Any):
        self.b = bench
        self.site: Site | None = None

    def close(self) -> None:
        if self.site is not None:
            self.site.close()
            self.site = None

    def run(self) -> dict[str, Any]:
        b = self.b
        opts = b.opts
        rng = random.Random(11)
        server = b.children.redis_server("expiry")
        client = redis.Redis.from_url(server.url)
        data.write_users(client, USERS, data.default_hasher().hash(PASSWORD), int(time.time() * 1000))
        m0 = client.info("memory")["used_memory"]
        longlived = opts.sessions - opts.burst
        now = int(time.time() * 1000)
        deadlines = [now + 1_500_000 + rng.randrange(300_000) for _ in range(longlived)]
        log(f"expiry: creating {longlived:,} long-lived sessions through LOGIN")
        start = time.perf_counter()
        data.create_sessions(client, longlived, USERS, deadlines, rng)
        create_s = time.perf_counter() - start
        m1 = client.info("memory")["used_memory"]
        for pattern in ("audit:*", "sa:sessev", "sa:st:*"):
            for key in list(client.scan_iter(match=pattern, count=1000)):
                client.delete(key)
        m2 = client.info("memory")["used_memory"]
        memory = {
            "sessions": longlived, "bytes_per_session": (m2 - m0) / longlived,
            "bytes_per_login_event": (m1 - m2) / longlived, "bytes_per_session_with_event": (m1 - m0) / longlived,
            "create_sessions_per_s": longlived / create_s,
        }
        log(f"expiry: {longlived / create_s:,.0f} sessions/s; {memory['bytes_per_session']:.0f} B per live session "
            f"(+{memory['bytes_per_login_event']:.0f} B for its login event)")

        self.site = Site(b.children, "expiry", redis_server=server).start()
        sealing.wait_sealed(client, 120)  # the login events loaded before it started: sealed first
        lead = opts.burst / memory["create_sessions_per_s"] * 1.5 + 2.0
        bursts = []
        for i in range(opts.bursts):
            if i and not b.afford("expiry", 14, f"expiry burst {i + 1}"):
                break
            second = math.ceil(time.time() + lead)
            burst_deadlines = [second * 1000 + (k * 1000) // opts.burst for k in range(opts.burst)]
            refs = data.create_sessions(client, opts.burst, USERS, burst_deadlines, rng)
            ready_margin = second - time.time()
            live = client.zcard(keys.DEADLINES)
            observed = self._watch(client, second, dict(zip(refs, burst_deadlines, strict=True)))
            bursts.append(self._collect(client, second, set(refs), live, ready_margin) | observed)
            x = bursts[-1]
            log(f"expiry: burst {i + 1}: {x['recorded']:,}/{x['expected']:,} recorded with {x['live_at_burst']:,} "
                f"live, lag p50 {x['lag_p50_ms']} ms, p99 {x['lag_p99_ms']} ms, max {x['lag_max_ms']} ms; "
                f"observed p99 {x['observed_lag_p99_ms'] or 0:.0f} ms")
        client.close()
        all_ok = all(x["recorded"] == x["expected"] and not x["duplicates"] and not x["strays"] for x in bursts)
        return {
            "memory": memory, "bursts": bursts, "burst_size": opts.burst,
            "live_sessions": median(x["live_at_burst"] for x in bursts),
            "all_recorded": all_ok, "recorded": sum(x["recorded"] for x in bursts),
            "expected": sum(x["expected"] for x in bursts),
            "lag_p99_ms": median(x["lag_p99_ms"] for x in bursts),
            "observed_lag_p99_ms": median(x["observed_lag_p99_ms"] for x in bursts),
            "lag_max_ms": max((x["lag_max_ms"] or 0) for x in bursts) if bursts else None,
        }

    def _watch(self, client: redis.Redis, second: int, deadlines: dict[str, int]) -> dict[str, Any]:
        """Poll the stream every 50 ms until every burst session has its `expired` event (at most
        15 s past the second): when each one became visible, minus its deadline, is the lag a
        reader of the trail sees (the event id's time is the sweeper's ``now`` at the start of
        its run, which a long run understates)."""
        last = client.xrevrange(keys.AUDIT, "+", "-", count=1)
        cursor = "(" + last[0][0].decode() if last else "-"
        seen: dict[str, float] = {}
        limit = second + 15
        while time.time() < limit and len(seen) < len(deadlines):
            entries = client.xrange(keys.AUDIT, cursor, "+", count=20000)
            now_ms = time.time() * 1000
            for _entry_id, fields in entries:
                ref = fields.get(b"s", b"").decode()
                if fields.get(b"t") == b"expired" and ref in deadlines:
                    seen.setdefault(ref, now_ms - deadlines[ref])
            if entries:
                cursor = "(" + entries[-1][0].decode()
            time.sleep(0.05)
        lags = list(seen.values())
        return {"observed_lag_p50_ms": percentile(lags, 50), "observed_lag_p99_ms": percentile(lags, 99),
                "observed_lag_max_ms": max(lags) if lags else None}

    def _collect(self, client: redis.Redis, second: int, refs: set[str], live: int,
                 ready_margin: float) -> dict[str, Any]:
        lags: list[float] = []
        seen: dict[str, int] = {}
        strays = 0
        cursor = str(second * 1000)
        while True:
            entries = client.xrange(keys.AUDIT, cursor, "+", count=5000)
            if not entries:
                break
            for entry_id, fields in entries:
                if fields.get(b"t") != b"expired":
                    continue
                ref = fields.get(b"s", b"").decode()
                id_ms = int(entry_id.split(b"-")[0])
                at = int(fields.get(b"a") or id_ms)
                if ref not in refs:
                    strays += 1
                    continue
                seen[ref] = seen.get(ref, 0) + 1
                lags.append(id_ms - at)
            cursor = "(" + entries[-1][0].decode()
        left = client.zcount(keys.DEADLINES, second * 1000, second * 1000 + 999)
        return {
            "second": second, "expected": len(refs), "recorded": len(seen),
            "duplicates": sum(n - 1 for n in seen.values()), "strays": strays, "still_live": left,
            "live_at_burst": live, "created_ahead_s": round(ready_margin, 2),
            "lag_p50_ms": percentile(lags, 50), "lag_p99_ms": percentile(lags, 99),
            "lag_max_ms": max(lags) if lags else None,
        }
