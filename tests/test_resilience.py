"""Redis going away and coming back; slow hashes not holding up other requests."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import pytest

from conftest import Browser, read_events, serving, test_settings
from sessionaudit.app import make_app
from sessionaudit.cli import redis_client
from sessionaudit.redis_server import RedisServer

pytestmark = pytest.mark.gen_test(timeout=60)


async def test_redis_down_gives_503_pages_then_recovers(tmp_path, http_client, clock) -> None:
    redis_server = RedisServer.ephemeral(tmp_path).start()
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    client = redis_client(redis_server.url)
    app = make_app(test_settings(), client, clock)
    try:
        async with serving(app) as base:
            b = Browser(http_client, base)
            assert (await b.register("down@example.com")).code == 303
            redis_server.stop()

            account = await b.get("/account")
            assert account.code == 503
            assert b"Temporarily unavailable" in account.body and b"Traceback" not in account.body
            assert (await b.get("/healthz")).code == 503
            login = await Browser(http_client, base).login("down@example.com")
            assert login.code == 503
            home = await Browser(http_client, base).get("/")
            assert home.code == 200  # anonymous pages need no Redis

            redis_server = RedisServer.ephemeral(tmp_path, port=port).start()  # empty again: no persistence
            for _ in range(100):  # the client reconnects by itself on the next request
                if (await b.get("/healthz")).code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await b.get("/healthz")).code == 200
            again = Browser(http_client, base)
            assert (await again.register("back@example.com")).code == 303
            assert (await again.get("/account")).code == 200
            assert [e.type for e in await read_events(client)] == ["register", "login"]
    finally:
        await client.aclose()
        redis_server.stop()


async def test_slow_hash_does_not_hold_up_other_requests(http_client, rdb, clock) -> None:
    """While logins hash with real (slow) costs, other pages are answered at once."""
    settings = dataclasses.replace(test_settings(), argon2_time_cost=3, argon2_memory_cost=65536,
                                   argon2_parallelism=4, hash_workers=1)
    app = make_app(settings, rdb, clock)
    async with serving(app) as base:
        b = Browser(http_client, base)
        await b.get("/login")
        done_order: list[str] = []

        async def login(i: int) -> None:
            await Browser(http_client, base).login(f"nobody{i}@example.com", "whatever it is here")
            done_order.append("login")

        async def health() -> None:
            await b.get("/healthz")
            done_order.append("health")

        logins = [asyncio.ensure_future(login(i)) for i in range(3)]
        while app.ctx.passwords.waiting == 0:  # wait until a hash is running
            await asyncio.sleep(0.001)
        await asyncio.gather(*(health() for _ in range(5)))
        await asyncio.gather(*logins)
        # Every health check finished before the first of the three hashes did.
        assert done_order[:5] == ["health"] * 5


async def test_a_full_hashing_queue_answers_503_not_a_longer_wait(http_client, rdb, clock) -> None:
    settings = dataclasses.replace(test_settings(), argon2_time_cost=3, argon2_memory_cost=65536,
                                   argon2_parallelism=4, hash_workers=1, hash_queue=1)
    app = make_app(settings, rdb, clock)
    async with serving(app) as base:
        browsers = [Browser(http_client, base) for _ in range(5)]
        for b in browsers:
            await b.get("/login")
        results = await asyncio.gather(*(b.login(f"q{i}@example.com", "whatever it is here")
                                         for i, b in enumerate(browsers)))
        codes = sorted(r.code for r in results)
        assert codes.count(401) == 2 and codes.count(503) == 3  # one hashing, one waiting, the rest refused
        busy = next(r for r in results if r.code == 503)
        assert busy.headers["Retry-After"] and b"Many people are signing in right now" in busy.body


async def test_a_form_posted_while_redis_is_down_gets_the_503_page_not_a_reset(tmp_path, http_client,
                                                                                clock) -> None:
    """The 503 is answered once the form's body has been read: a server that closes a connection with
    the body unread makes the kernel reset it, and the browser shows "connection reset" instead."""
    redis_server = RedisServer.ephemeral(tmp_path).start()
    client = redis_client(redis_server.url)
    app = make_app(test_settings(), client, clock)
    try:
        async with serving(app) as base:
            b = Browser(http_client, base)
            assert (await b.register("form@example.com")).code == 303
            assert (await b.get("/account")).code == 200  # its forms give the browser an XSRF token
            redis_server.stop()
            port = int(base.rsplit(":", 1)[1])
            cookies = "; ".join(f"{k}={v}" for k, v in b.cookies.items())
            body = f"_xsrf={b.cookies['_xsrf']}&email=form%40example.com&password={'p' * 4000}".encode()
            head = (f"POST /login HTTP/1.1\r\nHost: localhost\r\nCookie: {cookies}\r\n"
                    f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            loop = asyncio.get_running_loop()
            for _ in range(10):
                response = await loop.run_in_executor(None, _post_slowly, port, head, body)
                assert response.startswith(b"HTTP/1.1 503") and b"Temporarily unavailable" in response
    finally:
        await client.aclose()
        redis_server.stop()


def _post_slowly(port: int, head: bytes, body: bytes) -> bytes:
    """Send the headers, then the body a moment later (as over a real network), then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.05)
        sock.sendall(body)
        time.sleep(0.05)
        chunks = []
        while chunk := sock.recv(65536):  # ConnectionResetError when the server closed with the body unread
            chunks.append(chunk)
        return b"".join(chunks)
