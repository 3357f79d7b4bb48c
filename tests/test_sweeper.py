"""Expiry recorded exactly once: several processes, a restart after downtime, and the real clock."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import redis.asyncio as aioredis

from conftest import Browser, read_events, serving
from sessionaudit import keys
from sessionaudit.app import make_app
from sessionaudit.sessions import SessionStore
from sessionaudit.sweeper import Sweeper

pytestmark = pytest.mark.gen_test(timeout=30)


def store(client: aioredis.Redis, settings, clock) -> SessionStore:
    return SessionStore(client, settings.session_keys(), clock, idle=settings.session_idle,
                        lifetime=settings.session_lifetime)


async def log_in_many(browser_factory, n: int) -> None:
    first = browser_factory()
    await first.register("many@example.com")
    for _ in range(n - 1):
        await browser_factory().login("many@example.com")


async def test_two_processes_record_each_expiry_once(new_browser, settings, clock, redis_url, rdb) -> None:
    await log_in_many(new_browser, 30)
    clock.advance(settings.session_idle + 1)
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        stores = [store(c, settings, clock) for c in clients]
        results = await asyncio.gather(*(s.expire_due(batch=7) for s in stores for _ in range(3)))
        assert sum(count for count, _ in results) == 30
    finally:
        for c in clients:
            await c.aclose()
    expired = [e for e in await read_events(rdb) if e.type == "expired"]
    assert len(expired) == 30
    assert len({e.session for e in expired}) == 30
    assert await rdb.zcard(keys.DEADLINES) == 0
    assert (await make_app(settings, rdb, clock).ctx.audit.verify()).problems == []


async def test_expiry_while_no_server_ran_is_recorded_at_start_with_the_deadline(browser: Browser, settings, clock,
                                                                                  rdb, app) -> None:
    await browser.register("down@example.com")
    login = (await read_events(rdb))[-1]
    # The site stops; time passes beyond the deadline and the TTL backstop; a new process starts.
    clock.advance(settings.session_idle + settings.session_ttl_slack + 3600)
    await rdb.delete(*(await rdb.keys(keys.SESSION + "*")))  # what Redis's own expiry did meanwhile
    fresh = make_app(settings, rdb, clock)
    sweeper = Sweeper(fresh.ctx.sessions, fresh.ctx.audit, clock, interval=0.05)
    sweeper.start()
    try:
        for _ in range(200):
            if sweeper.runs:
                break
            await asyncio.sleep(0.01)
    finally:
        await sweeper.stop()
        fresh.ctx.close()
    expired = [e for e in await read_events(rdb) if e.type == "expired"]
    assert len(expired) == 1
    assert expired[0].at == login.at + settings.session_idle * 1000
    assert expired[0].session == login.session and expired[0].user == "down@example.com"
    assert (await browser.get("/account")).code == 302


async def test_sweeper_keeps_going_while_redis_is_down(settings, clock, tmp_path) -> None:
    from sessionaudit.cli import redis_client
    from sessionaudit.redis_server import RedisServer
    server = RedisServer.ephemeral(tmp_path).start()
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    client = redis_client(server.url)
    app = make_app(settings, client, clock)
    sweeper = Sweeper(app.ctx.sessions, app.ctx.audit, clock, interval=0.02)
    try:
        sweeper.start()
        server.stop()
        runs = sweeper.runs
        for _ in range(300):  # until a tick has failed
            if sweeper.failing:
                break
            await asyncio.sleep(0.02)
        assert sweeper.failing and sweeper._task and not sweeper._task.done()
        server = RedisServer.ephemeral(tmp_path, port=port).start()
        for _ in range(300):
            if sweeper.runs > runs:
                break
            await asyncio.sleep(0.02)
        assert sweeper.runs > runs
    finally:
        await sweeper.stop()
        app.ctx.close()
        await client.aclose()
        server.stop()


async def test_real_clock_expiry_is_recorded_within_two_seconds(http_client, rdb, settings) -> None:
    """One test on the real clock: idle limit 1 s, the sweeper at its default interval."""
    real = dataclasses.replace(settings, session_idle=1)
    app = make_app(real, rdb, time.time)
    sweeper = Sweeper(app.ctx.sessions, app.ctx.audit, time.time, interval=1.0)
    sweeper.start()
    try:
        async with serving(app) as base:
            b = Browser(http_client, base)
            await b.register("clock@example.com")
            deadline = time.time() + 8
            expired = []
            while not expired and time.time() < deadline:
                await asyncio.sleep(0.05)
                expired = [e for e in await read_events(rdb) if e.type == "expired"]
            assert len(expired) == 1
            recorded_ms = int(expired[0].id.split("-")[0])
            assert 0 <= recorded_ms - expired[0].at <= 2000
    finally:
        await sweeper.stop()
