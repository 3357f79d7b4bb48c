"""Background work on the IOLoop: record expired sessions every second, record the summaries of
refused attempts whose window is over, trim old audit events.

Safe with any number of processes on one Redis: each claim is a script that re-checks the
deadline, so a session is recorded as expired exactly once. While Redis is down a run fails
quietly (one warning, then one line when it is back) and the next tick tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.exceptions

from .audit import AuditLog
from .redisconn import UNAVAILABLE
from .sessions import SessionStore
from .throttle import Throttle

log = logging.getLogger("sessionaudit.sweeper")

MIN_PAUSE = 0.1  # seconds: the sweeper never runs more often than this
TRIM_EVERY = 60.0  # seconds between retention runs
TRIM_STEPS = 10  # steps (of 500 events) per retention run: bounded work, Redis never blocked long


class Sweeper:
    """Run ``run_once`` every ``interval`` seconds until ``stop``."""

    def __init__(self, sessions: SessionStore, audit: AuditLog, clock: Callable[[], float], *,
                 throttle: Throttle | None = None, interval: float = 1.0, retention_days: int = 365, trim: bool = True,
                 on_run: Callable[[int, int], None] | None = None,
                 on_reconnect: Callable[[], None] | None = None):
        self.sessions = sessions
        self.audit = audit
        self.throttle = throttle
        self.clock = clock
        self.interval = interval
        self.retention_ms = retention_days * 86_400_000
        self.trim = trim and retention_days > 0
        self.on_run = on_run  # metrics hook: (expired, lag ms)
        self.on_reconnect = on_reconnect  # metrics hook: Redis is back after an outage
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._last_trim: int | None = None
        self.failing = False
        self.runs = 0

    async def run_once(self) -> int:
        """Record every due expiry (and now and then a retention step); return how many expired."""
        now = int(self.clock() * 1000)
        expired, lag = await self.sessions.expire_due()
        if self.on_run:
            self.on_run(expired, lag)
        if self.throttle:
            await self.throttle.flush_due()
        if self.trim and (self._last_trim is None or now - self._last_trim >= TRIM_EVERY * 1000):
            self._last_trim = now
            for _ in range(TRIM_STEPS):
                if await self.audit.trim_step(now - self.retention_ms) == 0:
                    break
        self.runs += 1
        return expired

    def start(self) -> None:
        """Start the loop; its first run catches up with whatever expired while no server ran."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            await self._task
            self._task = None

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
                if self.failing:
                    log.warning("sweeper: Redis is reachable again")
                    self.failing = False
                    if self.on_reconnect:
                        self.on_reconnect()
            except UNAVAILABLE as e:
                if not self.failing:
                    log.warning("sweeper: Redis unreachable (%s); retrying every %.1f s", e, self.interval)
                    self.failing = True
            except redis.exceptions.ResponseError as e:
                if _refused(e) and self.trim:
                    log.warning("sweeper: no permission to trim the audit trail: retention is left to "
                                "`server.py audit trim` (append-only mode)")
                    self.trim = False
                else:
                    log.exception("sweeper: run failed")
            except Exception:
                log.exception("sweeper: run failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), await self._pause())
            except TimeoutError:
                pass

    async def _pause(self) -> float:
        """Seconds until the next run: the interval, or less when a deadline falls due sooner.

        Waking at the earliest deadline (but not more often than MIN_PAUSE) records a burst of
        expiries as it happens instead of up to a whole interval later.
        """
        if self.failing:
            return self.interval
        try:
            soonest = await self.sessions.oldest_deadline()
        except (redis.exceptions.RedisError, OSError):
            return self.interval
        if soonest is None:
            return self.interval
        due_in = (soonest - self.clock() * 1000) / 1000
        return min(self.interval, max(MIN_PAUSE, due_in))


def _refused(error: Exception) -> bool:
    """A permission refusal, also when a script reports it (Redis 7: "... can't access ...")."""
    text = str(error)
    return isinstance(error, redis.exceptions.NoPermissionError) or "NOPERM" in text or "can't access" in text \
        or "has no permissions" in text
