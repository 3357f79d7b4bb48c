"""The dashboard's numbers, read from counters written with each event: a chart costs its buckets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from . import keys

SERIES = ("login", "login_failed", "expired", "revoked")
METHODS = ("password", "totp", "recovery_code", "passkey")  # how logins were proved: fields 'login:<method>'
METHOD_FIELDS = tuple(f"login:{m}" for m in METHODS)
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


@dataclass
class Buckets:
    """Counts of each series per bucket, oldest first; ``starts`` are the buckets' start times (ms)."""

    starts: list[int]
    counts: dict[str, list[int]]
    unit: str  # "hour" or "day"


@dataclass
class Overview:
    live_sessions: int
    logins_today: int
    failures_last_hour: int
    top_failing: list[tuple[str, int]]
    hours: Buckets
    days: Buckets
    methods_day: dict[str, int]  # logins by how they were proved, last 24 hours
    methods_month: dict[str, int]  # the same, last 30 days
    moved: int = 0  # sessions that moved in the last 24 hours
    moved_latest: list[tuple[str, int]] = field(default_factory=list)  # (ref, when), the latest first


class Stats:
    def __init__(self, redis: aioredis.Redis, clock: Callable[[], float]):
        self.redis = redis
        self.clock = clock

    async def overview(self) -> Overview:
        """Everything the dashboard shows, in one pipelined round trip."""
        now = int(self.clock() * 1000)
        hour, day, minute = now // HOUR_MS, now // DAY_MS, now // 60_000
        hours = list(range(hour - 23, hour + 1))
        days = list(range(day - 29, day + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.DEADLINES)
            for h in hours:
                pipe.hmget(keys.STATS_HOUR + str(h), *SERIES, *METHOD_FIELDS)
            for d in days:
                pipe.hmget(keys.STATS_DAY + str(d), *SERIES, *METHOD_FIELDS)
            pipe.hget(keys.STATS_DAY + str(day), "login")
            pipe.mget([keys.FAIL_MINUTE + str(m) for m in range(minute - 59, minute + 1)])
            pipe.zunion([keys.FAIL_IPS + str(h) for h in hours], withscores=True)
            pipe.zcount(keys.MOVED, now - DAY_MS, "+inf")
            pipe.zrevrangebyscore(keys.MOVED, "+inf", now - DAY_MS, start=0, num=10, withscores=True)
            replies = await pipe.execute()
        live = replies[0]
        hour_rows = replies[1:25]
        day_rows = replies[25:55]
        logins_today = int(replies[55] or 0)
        failures = sum(int(v) for v in replies[56] if v)
        top = sorted(((ip.decode(), int(score)) for ip, score in replies[57]), key=lambda t: (-t[1], t[0]))[:10]
        return Overview(live, logins_today, failures, top,
                        _buckets(hours, hour_rows, HOUR_MS, "hour"), _buckets(days, day_rows, DAY_MS, "day"),
                        _methods(hour_rows), _methods(day_rows),
                        moved=replies[58], moved_latest=[(ref.decode(), int(at)) for ref, at in replies[59]])


def _methods(rows: list[list[bytes | None]]) -> dict[str, int]:
    """Logins by method over the buckets (the fields after SERIES in each row)."""
    return {m: sum(int(row[len(SERIES) + i] or 0) for row in rows) for i, m in enumerate(METHODS)}


def _buckets(numbers: list[int], rows: list[list[bytes | None]], size: int, unit: str) -> Buckets:
    counts = {s: [int(row[i] or 0) for row in rows] for i, s in enumerate(SERIES)}
    return Buckets([n * size for n in numbers], counts, unit)
