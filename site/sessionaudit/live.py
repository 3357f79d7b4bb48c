"""Live follow of the audit trail: one Redis reader per process, fanned out to every follower.

The reader blocks in ``XREAD`` on a connection of its own (its socket timeout longer than the
block, so an idle stream is not mistaken for a dead server) and hands each new event to the
followers whose filters match. A follower that falls too far behind is dropped; its browser
reconnects with ``Last-Event-ID`` and the handler replays what it missed from the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from . import keys, redisconn
from .audit import Query, with_agents
from .events import Event

log = logging.getLogger("sessionaudit.live")

BLOCK_MS = 5000
QUEUE_MAX = 1000  # events a follower may have unsent before it is dropped (it resumes by id)


def matches(q: Query, e: Event) -> bool:
    """Whether an event passes the filters of the audit views (the page's semantics)."""
    if q.user and e.user != q.user:
        return False
    if q.type and e.type != q.type:
        return False
    if q.since is not None and e.at < q.since:
        return False
    return q.until is None or e.at <= q.until


class Follower:
    """One connected admin: a filter and a queue of events for it."""

    def __init__(self, query: Query):
        self.query = query
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_MAX)
        self.dropped = False

    def offer(self, event: Event) -> None:
        if self.dropped or not matches(self.query, event):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stop(dropped=True)

    def stop(self, dropped: bool = False) -> None:
        """End this follower's stream (shutdown, or too slow)."""
        self.dropped = self.dropped or dropped
        while True:  # make room for the end marker
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class LiveHub:
    """The process's single stream reader. Started with the first follower, stopped with the app."""

    def __init__(self, redis: aioredis.Redis, *, max_followers: int, on_change: Callable[[int], None] | None = None):
        # Its own connection (to the primary that Sentinel names, when it does: it follows a
        # failover), with a socket timeout longer than the block (redis-py #2807, #3138).
        self.redis = redisconn.dedicated(redis, socket_timeout=BLOCK_MS / 1000 + 10)
        self.max_followers = max_followers
        self.followers: set[Follower] = set()
        self.on_change = on_change
        self.last_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    def full(self) -> bool:
        return len(self.followers) >= self.max_followers

    async def attach(self, query: Query) -> Follower:
        """A new follower; events appended from now on reach it."""
        follower = Follower(query)
        self.followers.add(follower)
        self._changed()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        await self._started.wait()
        return follower

    def detach(self, follower: Follower) -> None:
        self.followers.discard(follower)
        self._changed()

    def stop_all(self) -> None:
        for follower in list(self.followers):
            follower.stop()

    async def close(self) -> None:
        self.stop_all()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.redis.aclose()
        await self.redis.connection_pool.aclose()

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(len(self.followers))

    async def _run(self) -> None:
        failing = False
        checked = time.monotonic()
        while True:
            try:
                if time.monotonic() - checked >= BLOCK_MS / 1000:  # a planned failover leaves us on a replica
                    checked = time.monotonic()
                    await redisconn.follow_primary(self.redis)
                if self.last_id is None:
                    newest = await self.redis.xrevrange(keys.AUDIT, count=1)
                    self.last_id = newest[0][0].decode() if newest else "0-0"
                    self._started.set()
                reply = await self.redis.xread({keys.AUDIT: self.last_id}, count=500, block=BLOCK_MS)
                if failing:
                    log.warning("live follow: Redis is reachable again")
                    failing = False
                for _stream, entries in reply or []:
                    batch = await with_agents(self.redis, [Event.from_entry(i, f) for i, f in entries])
                    for event in batch:
                        self.last_id = event.id
                        for follower in list(self.followers):
                            follower.offer(event)
            except asyncio.CancelledError:
                raise
            except redisconn.UNAVAILABLE as e:
                if not failing:
                    log.warning("live follow: Redis unreachable (%s); retrying", e)
                    failing = True
                self._started.set()  # followers get their heartbeats meanwhile
                await asyncio.sleep(1)
            except Exception:
                log.exception("live follow: reader failed; retrying")
                await asyncio.sleep(1)


async def replay(redis: aioredis.Redis, after: str, query: Query, until_id: str | None, chunk: int = 500) -> Any:
    """Events after ``after`` up to ``until_id`` (inclusive) matching ``query``: what a resuming follower missed."""
    cursor = f"({after}"
    end = until_id or "+"
    while True:
        entries = await redis.xrange(keys.AUDIT, cursor, end, count=chunk)
        for event in await with_agents(redis, [Event.from_entry(i, f) for i, f in entries]):
            if matches(query, event):
                yield event
        if len(entries) < chunk:
            return
        cursor = "(" + entries[-1][0].decode()
