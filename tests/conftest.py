"""Fixtures: a real redis-server (same binary finder as the site), a fake clock, the app, a browser."""

from __future__ import annotations

import contextlib
import dataclasses
import http.cookies
import socket
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import tornado.httpclient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "site"))

from sessionaudit import keys  # noqa: E402
from sessionaudit.app import make_app  # noqa: E402
from sessionaudit.audit import with_agents  # noqa: E402
from sessionaudit.config import Settings  # noqa: E402
from sessionaudit.events import Event  # noqa: E402
from sessionaudit.redis_server import RedisServer  # noqa: E402

PASSWORD = "correct horse battery staple"
UA_FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
UA_IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1")


class FakeClock:
    """The app's clock in tests: seconds, moved only by ``advance``."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def next_day(self) -> None:
        """To a second after the next UTC midnight: what follows lies within one day (daily budgets)."""
        self.advance(86_400 - self.now % 86_400 + 1)


def test_settings(**overrides: Any) -> Settings:
    """Real but cheap argon2 costs, short limits, fixed secrets."""
    base = Settings(
        argon2_time_cost=1, argon2_memory_cost=1024, argon2_parallelism=1, hash_workers=2,
        session_idle=300, session_lifetime=3600,
        cookie_secret={1: "test-cookie-secret-0123456789abcdef"}, session_secret=b"test-session-secret",
        login_account_threshold=3, login_address_threshold=20, login_backoff_base=2.0, login_backoff_max=60.0,
    )
    return dataclasses.replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = RedisServer.ephemeral(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def redis_major(client: redis.Redis) -> int:
    """The major version of the Redis ``client`` talks to (7 has functions and ACL selectors)."""
    return int(str(client.info("server")["redis_version"]).split(".")[0])


def emptied(url: str) -> str:
    """Flush the Redis at ``url`` (keys, scripts, functions), so no test sees another's data; return the URL."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.script_flush()
    if redis_major(client) >= 7:
        client.function_flush()
    client.close()
    return url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return emptied(redis_server.url)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return test_settings(data_dir=str(tmp_path))  # mail without an SMTP server goes to tmp_path/outbox


@pytest.fixture
def rdb(redis_url: str, io_loop: Any) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    io_loop.run_sync(client.aclose)


@pytest.fixture
def app(settings: Settings, rdb: aioredis.Redis, clock: FakeClock, io_loop: Any) -> Any:
    application = make_app(settings, rdb, clock)
    yield application
    io_loop.run_sync(application.ctx.close_followers)
    io_loop.run_sync(application.ctx.mailer.stop)
    application.ctx.close()


class Browser:
    """A user agent for tests: keeps cookies, sends the XSRF token, never follows redirects."""

    def __init__(self, client: tornado.httpclient.AsyncHTTPClient, base_url: str, user_agent: str = UA_FIREFOX):
        self.client = client
        self.base_url = base_url
        self.user_agent = user_agent
        self.cookies: dict[str, str] = {}
        self.last_set_cookies: list[str] = []

    async def fetch(self, path: str, method: str = "GET", body: bytes | str | None = None,
                    headers: dict[str, str] | None = None, **kw: Any) -> tornado.httpclient.HTTPResponse:
        all_headers = {"User-Agent": self.user_agent, **(headers or {})}
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = await self.client.fetch(self.base_url + path, method=method, body=body, headers=all_headers,
                                           follow_redirects=False, raise_error=False, **kw)
        self.last_set_cookies = response.headers.get_list("Set-Cookie")
        for line in self.last_set_cookies:
            jar = http.cookies.SimpleCookie()
            jar.load(line)
            for name, morsel in jar.items():
                if (morsel["expires"] and "1970" in morsel["expires"]) or morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    async def get(self, path: str, **kw: Any) -> tornado.httpclient.HTTPResponse:
        return await self.fetch(path, **kw)

    async def post(self, path: str, data: dict[str, str] | None = None, *, xsrf: bool = True,
                   **kw: Any) -> tornado.httpclient.HTTPResponse:
        data = dict(data or {})
        if xsrf:
            if "_xsrf" not in self.cookies:
                await self.get("/login")
            data.setdefault("_xsrf", self.cookies["_xsrf"])
        body = urllib.parse.urlencode(data)
        headers = {"Content-Type": "application/x-www-form-urlencoded", **kw.pop("headers", {})}
        return await self.fetch(path, method="POST", body=body, headers=headers, **kw)

    async def register(self, email: str, password: str = PASSWORD) -> tornado.httpclient.HTTPResponse:
        return await self.post("/register", {"email": email, "password": password, "password_confirm": password})

    async def login(self, email: str, password: str = PASSWORD, **extra: str) -> tornado.httpclient.HTTPResponse:
        return await self.post("/login", {"email": email, "password": password, **extra})

    async def logout(self) -> tornado.httpclient.HTTPResponse:
        return await self.post("/logout")


@pytest.fixture
def browser(http_client: Any, base_url: str) -> Browser:
    return Browser(http_client, base_url)


@pytest.fixture
def new_browser(http_client: Any, base_url: str) -> Any:
    """Make more browsers (another device of the same user, an attacker...)."""
    return lambda user_agent=UA_FIREFOX: Browser(http_client, base_url, user_agent)


@contextlib.asynccontextmanager
async def serving(app: Any, send_buffer: int | None = None, **server_options: Any) -> Any:
    """Serve another app (own settings, client or clock) beside the fixture's; yields its base URL.
    ``send_buffer``: the kernel's send buffer of every connection, in bytes (a small one shows what
    the server hands a slow client, which a large one would absorb)."""
    sock, port = bind_unused_port()
    if send_buffer:  # accepted connections inherit it from the listening socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    server = HTTPServer(app, **server_options)
    server.add_socket(sock)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        await app.ctx.close_followers()
        await app.ctx.mailer.stop()
        app.ctx.close()


def scripts_run(commandstats: dict[str, Any]) -> int:
    """Scripts and functions Redis has run, from INFO commandstats (the page's runs as a function on Redis 7)."""
    return sum(commandstats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval", "fcall"))


class CountedRedis(aioredis.Redis):
    """A Redis client that counts what it sends: one write a command, or one for a whole pipeline.

    What the one-round-trip tests count, beside the scripts Redis itself counts (``scripts_run``).
    """

    def __init__(self, url: str):
        counter = self

        class CountingConnection(aioredis.Connection):
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                counter.sent += 1
                return await super().send_packed_command(command, check_health)

        self.sent = 0
        self._counted_pool = aioredis.ConnectionPool.from_url(url, connection_class=CountingConnection)
        super().__init__(connection_pool=self._counted_pool)

    async def close(self) -> None:  # type: ignore[override]
        await self.aclose()
        await self._counted_pool.aclose()


async def read_events(rdb: aioredis.Redis) -> list[Event]:
    """The whole audit stream, oldest first (user agents filled in from their dictionary)."""
    return await with_agents(rdb, [Event.from_entry(i, f) for i, f in await rdb.xrange(keys.AUDIT)])


async def make_admin(rdb: aioredis.Redis, email: str) -> None:
    uid = await rdb.hget(keys.EMAILS, email)
    await rdb.hset(keys.USER + uid.decode(), "admin", "1")


async def register_admin(b: Browser, rdb: aioredis.Redis, email: str) -> Browser:
    """Register ``email`` in ``b`` (which is then signed in) and give the account admin rights."""
    assert (await b.register(email)).code == 303
    await make_admin(rdb, email)
    return b


async def admin_browser(new_browser: Callable[..., Browser], rdb: aioredis.Redis,
                        email: str = "root@example.com") -> Browser:
    """A new browser signed in as a new admin."""
    return await register_admin(new_browser(), rdb, email)
