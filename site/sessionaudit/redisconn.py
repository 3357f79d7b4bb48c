"""The one place that builds Redis clients: from a URL, or for the primary that Redis Sentinel names.

Every client gives up fast when Redis does not answer (pages answer 503) and reconnects by itself.
A client built through Sentinel asks the Sentinels for the primary each time it opens a
connection, so after a failover its next connection goes to the new primary. A connection still
open to a demoted primary fails on its next write with READONLY, which redis-py turns into a
reconnect. During the failover itself the Sentinels name no primary (``MasterNotFoundError``, a
``ConnectionError``): requests answer 503 until the new primary is found. A planned failover
leaves the old primary up and writable for a while: ``PrimaryWatch`` moves connections off it.

``--redis-wait-replicas``: a client carries how many replicas must hold a state change before it
is answered (``set_wait``); ``keys.Script`` reads it for the scripts that change state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from . import config
from .config import Settings

# Connection settings of every client of the site: give up fast, retry a little, reconnect.
CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 5,  # seconds; a WAIT ends before (config.MAX_WAIT_TIMEOUT)
    "socket_connect_timeout": 2,
    "health_check_interval": 30,
}
# Asking the Sentinels: one try each, quickly, then the next Sentinel.
SENTINEL_OPTIONS: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 1}

log = logging.getLogger("sessionaudit.redis")

_WAIT = "_sessionaudit_wait"  # attribute of a client: (replicas, timeout in ms) for state changes


class NotReplicated(redis.exceptions.TimeoutError):
    """Fewer replicas than ``--redis-wait-replicas`` confirmed a state change in time.

    The change is on the primary; it survives a failover only if a replica got it after all.
    """


class ReplicasMissing(redis.exceptions.ConnectionError):
    """The primary refuses writes: fewer good replicas than its ``min-replicas-to-write``."""


# What makes a page answer 503 (and the sweeper and the live reader wait and retry).
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # also MasterNotFoundError, BusyLoadingError, ReplicasMissing
    redis.exceptions.TimeoutError,  # also NotReplicated
    redis.exceptions.ReadOnlyError,  # a replica (a demoted primary) behind a plain URL
)

# Error replies that mean "no writes here now", not a bug: turned into ReplicasMissing.
_REFUSED = ("NOREPLICAS", "MASTERDOWN")


def refused_write(error: redis.exceptions.ResponseError) -> Exception:
    """``error`` as ReplicasMissing when Redis refused a write for want of replicas, else itself."""
    return ReplicasMissing(str(error)) if str(error).startswith(_REFUSED) else error


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2)


def redis_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """A client of the Redis at ``url``."""
    return aioredis.Redis.from_url(url, **{"retry": _retry(), **CLIENT_OPTIONS, **kwargs})


class Sentinels(Sentinel):
    """redis-py's Sentinel client, with a look-up of the primary that concurrent callers cannot corrupt.

    Upstream's ``discover_master`` moves the Sentinel that answered to the front of its shared
    list by an index read before its ``await``. Concurrent look-ups (every request during a
    failover makes one) then duplicate one Sentinel in the list and drop another, which is never
    asked again, nor closed (redis-py PR #4331 discusses the same code). Here the list is read as
    a copy and reordered with no ``await`` in between, so it stays the same Sentinels.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[str] = []
        for sentinel in list(self.sentinels):
            try:
                masters = await sentinel.sentinel_masters()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                kwargs = sentinel.connection_pool.connection_kwargs
                errors.append(f"{kwargs.get('host')}:{kwargs.get('port')}: {e}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                self.sentinels.remove(sentinel)
                self.sentinels.insert(0, sentinel)
                ip = self._force_master_ip if self._force_master_ip is not None else state["ip"]
                return ip, state["port"]
        found = f" ({'; '.join(errors)})" if errors else ""
        raise MasterNotFoundError(f"No master found for {service_name!r}{found}")


class PrimaryPool(SentinelConnectionPool):
    """Connections to the primary that the Sentinels name. One handed back from a server that is
    no longer the primary is closed rather than kept for the next request (redis-py's synchronous
    pool does so; its asyncio pool keeps it)."""

    async def release(self, connection: Any) -> None:
        if self.master_address and (connection.host, connection.port) != self.master_address:
            await connection.disconnect()
        await super().release(connection)


class PrimaryWatch:
    """Asks the Sentinels where the primary is once a second, so connections follow a planned failover.

    ``SENTINEL FAILOVER`` leaves the old primary running, and taking writes, until the Sentinels
    turn it into a replica, up to 10 s later (their INFO period). Connections still open to it
    would write there meanwhile, and what they write is lost when it resyncs as a replica. When
    the primary has moved, idle connections are closed (and busy ones when handed back), so the
    next request connects to the new one. Without Sentinel, it does nothing.
    """

    def __init__(self, client: aioredis.Redis, interval: float = 1.0):
        self.client = client
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if isinstance(self.client.connection_pool, SentinelConnectionPool):
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await follow_primary(self.client)
            except UNAVAILABLE:
                pass  # no primary during a failover: the pages say so
            except Exception:
                log.exception("asking the Sentinels for the primary failed")
            await asyncio.sleep(self.interval)


class SentinelRedis(aioredis.Redis):
    """The client of a Sentinel-managed primary; closing it also closes the Sentinel connections."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def sentinel_client(settings: Settings) -> aioredis.Redis:
    """A client of the primary that the Sentinels of ``settings`` name, following its failovers."""
    tls: dict[str, Any] = {}
    if settings.redis_tls or settings.redis_tls_ca or settings.redis_tls_cert:
        tls = {"ssl": True, "ssl_ca_certs": settings.redis_tls_ca or None,
               "ssl_certfile": settings.redis_tls_cert or None, "ssl_keyfile": settings.redis_tls_key or None}
    sentinels = Sentinels(
        config.parse_sentinels(settings.redis_sentinel),
        sentinel_kwargs={**SENTINEL_OPTIONS, "retry": Retry(NoBackoff(), 0),
                         "username": settings.redis_sentinel_username or None,
                         "password": settings.redis_sentinel_password or None, **tls},
        retry=_retry(), username=settings.redis_username or None, password=settings.redis_password or None,
        **CLIENT_OPTIONS, **tls)
    return sentinels.master_for(settings.redis_sentinel_master, redis_class=SentinelRedis,
                                connection_pool_class=PrimaryPool)


def connect(settings: Settings, url: str = "") -> aioredis.Redis:
    """The client of the site and its commands: through Sentinel when configured, else ``url``."""
    client = sentinel_client(settings) if settings.redis_sentinel else redis_client(url or settings.redis_url)
    set_wait(client, settings.redis_wait_replicas, settings.redis_wait_timeout)
    return client


def dedicated(client: aioredis.Redis, **overrides: Any) -> aioredis.Redis:
    """A client with one connection of its own to the same Redis (through the same Sentinels),
    e.g. for a blocking read with a longer socket timeout. The caller closes it and its pool."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    kwargs.update(overrides)
    if isinstance(pool, SentinelConnectionPool):
        own: aioredis.ConnectionPool = type(pool)(
            pool.service_name, pool.sentinel_manager, connection_class=pool.connection_class,
            is_master=pool.is_master, check_connection=pool.check_connection, max_connections=1, **kwargs)
    else:
        own = aioredis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **kwargs)
    return aioredis.Redis(connection_pool=own)


async def follow_primary(client: aioredis.Redis) -> None:
    """Ask the Sentinels where the primary is, and drop ``client``'s idle connections if it moved.

    After a planned failover a connection to the old primary keeps working: as a primary until
    the Sentinels demote it (writes land where they will be lost), then as a replica that still
    answers reads (a blocked XREAD too). Only a write after the demotion (READONLY) would move it.
    Without Sentinel: nothing to do.
    """
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        await pool.get_master_address()


def set_wait(client: aioredis.Redis, replicas: int, timeout: float) -> None:
    """Answer a state change made through ``client`` only once ``replicas`` replicas hold it,
    waiting at most ``timeout`` seconds (0 replicas: answer at once, and send no WAIT)."""
    setattr(client, _WAIT, (replicas, max(1, round(timeout * 1000))) if replicas > 0 else None)


def wait_of(client: aioredis.Redis) -> tuple[int, int] | None:
    """(replicas, timeout in ms) that a state change through ``client`` waits for, or None."""
    return getattr(client, _WAIT, None)


def describe(settings: Settings, url: str) -> str:
    """Where the site's Redis is, for logs: never a password."""
    if settings.redis_sentinel:
        return f"primary {settings.redis_sentinel_master!r} through Sentinel {settings.redis_sentinel}"
    return safe_url(url)


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
