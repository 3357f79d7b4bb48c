"""Live follow of the audit trail: one Redis reader per process, fanned out to every follower.

The reader blocks in ``XREAD`` on a connection of its own (its socket timeout longer than the
block, so an idle stream is not mistaken for a dead server) and hands each new event to the
followers whose filters match. A follower that falls too far behind is dropped; its browser
reconnects with ``Last-Event-ID`` and the handler replays what it missed from the stream.

The hub is also the one place that checks followers: every ``recheck`` seconds, whatever the
traffic, one script asks which followers' sessions are still live and admin, and ends the
streams of the others (logged out, expired, revoked, disabled, or no longer admin).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
import redis.exceptions

from . import keys
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
    """One connected admin: the session it follows with, a filter and a queue of events for it."""

    def __init__(self, query: Query, ref: str = ""):
        self.query = query
        self.ref = ref
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_MAX)
        self.dropped = False
        self.stopped = False

    def offer(self, event: Event) -> None:
        if self.dropped or not matches(self.query, event):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stop(dropped=True)

    def stop(self, dropped: bool = False) -> None:
        """End this follower's stream (shutdown, too slow, or its session no longer allows it)."""
        self.dropped = self.dropped or dropped
        self.stopped = True
        while True:  # make room for the end marker
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class LiveHub:
    """The process's single stream reader. Started with the first follower, stopped with the app."""

    def __init__(self, redis: aioredis.Redis, *, max_followers: int, on_change: Callable[[int], None] | None = None,
                 allowed: Callable[[set[str]], Awaitable[set[str]]] | None = None, recheck: float = 10.0):
        kwargs = dict(redis.connection_pool.connection_kwargs)
        kwargs["socket_timeout"] = BLOCK_MS / 1000 + 10  # longer than the block (redis-py #2807, #3138)
        self.redis = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            connection_class=redis.connection_pool.connection_class, max_connections=1, **kwargs))
        self.max_followers = max_followers
        self.followers: set[Follower] = set()
        self.on_change = on_change
        self.allowed = allowed  # which of these session refs may still follow (live and admin)
        self.recheck = recheck  # seconds between those checks
        self.last_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    def full(self) -> bool:
        return len(self.followers) >= self.max_followers

    async def attach(self, query: Query, ref: str = "") -> Follower:
        """A new follower (following with the session ``ref``); events appended from now on reach it."""
        follower = Follower(query, ref)
        self.followers.add(follower)
        self._changed()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._checker is None and self.allowed is not None:
            self._checker = asyncio.get_running_loop().create_task(self._check_loop())
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
        for task in (self._task, self._checker):
            if task:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._checker = None
        await self.redis.aclose()
        await self.redis.connection_pool.aclose()

    async def check_followers(self) -> int:
        """End the streams of followers whose session may no longer follow; how many were ended."""
        followers = [f for f in self.followers if not f.stopped]
        if not followers or self.allowed is None:
            return 0
        allowed = await self.allowed({f.ref for f in followers})
        ended = 0
        for follower in followers:
            if follower.ref not in allowed:
                follower.stop()
                ended += 1
        return ended

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.recheck)
            try:
                if ended := await self.check_followers():
                    log.info("live follow: ended %d stream(s) whose session may no longer follow", ended)
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass  # Redis down: the streams carry nothing meanwhile; checked again next time
            except Exception:
                log.exception("live follow: checking followers failed")

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(len(self.followers))

    async def _run(self) -> None:
        failing = False
        while True:
            try:
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
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                if not failing:
                    log.warning("live follow: Redis unreachable (%s); retrying", e)
                    failing = True
                self._started.set()  # followers get their heartbeats meanwhile
                await asyncio.sleep(1)
            except Exception:
                log.exception("live follow: reader failed; retrying")
                await asyncio.sleep(1)


async def replay(redis: aioredis.Redis, after: str, query: Query, until_id: str | None,
                 chunk: int = 500) -> AsyncIterator[list[Event]]:
    """Events after ``after`` up to ``until_id`` (inclusive) matching ``query``: what a resuming follower
    missed, a chunk at a time (the caller sends each before the next is read)."""
    cursor = f"({after}"
    end = until_id or "+"
    while True:
        entries = await redis.xrange(keys.AUDIT, cursor, end, count=chunk)
        found = [e for e in await with_agents(redis, [Event.from_entry(i, f) for i, f in entries])
                 if matches(query, e)]
        if found:
            yield found
        if len(entries) < chunk:
            return
        cursor = "(" + entries[-1][0].decode()
