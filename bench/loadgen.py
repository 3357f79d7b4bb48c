"""A small asyncio HTTP/1.1 load generator (keep-alive, raw sockets), run as its own process.

Modes (each bounded by --duration; the last line on stdout is one JSON object):

  closed  N connections, each sending its next request when the last one is answered (like wrk)
  paced   open loop at --rate requests/s over up to N connections; latency is counted from the time
          a request was due, so a stalled server is not hidden (no coordinated omission)
  storm   N clients logging in continuously (POST /login with the _xsrf cookie and field); prints
          READY once every client holds its token, then runs for --duration
  flood   one attacker on N connections posting logins to one account (--emails) with a wrong
          password and a new --ua-bytes User-Agent each time (distinct in its first bytes, which are
          all the site keeps); prints READY once it holds its token, then runs for --duration or
          until --count attempts have been answered

The bench uses wrk for closed-loop runs when it is installed, and this otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.cookies
import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any


class Conn:
    """One keep-alive connection."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def request(self, data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: list[tuple[bytes, bytes]] = []
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            headers.append((name, value))
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.lower() == b"close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size + 2))
            body = b"".join(p[:-2] for p in parts)
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            close = True
        if close:
            self.close()
        return status, headers, body


def build_request(method: str, path: str, headers: list[str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def summary(latencies: list[float], elapsed: float, errors: int, bad: int, statuses: dict[int, int]) -> dict[str, Any]:
    return {
        "requests": len(latencies), "duration": elapsed, "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": _ms(pct(latencies, 50)), "p90_ms": _ms(pct(latencies, 90)), "p99_ms": _ms(pct(latencies, 99)),
        "max_ms": _ms(max(latencies) if latencies else None), "errors": errors, "bad_status": bad,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


class Tally:
    """Latency, finish time and status of each request completed before the deadline."""

    def __init__(self, duration: float):
        self.start = time.perf_counter()
        self.deadline = self.start + duration
        self.latencies: list[float] = []
        self.done_at: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0

    async def loop(self, conn: Conn, data: bytes | Callable[[], bytes | None], retry_pause: float) -> None:
        """Send ``data`` on ``conn`` back to back until the deadline (closed loop); a callable makes
        each request anew, and returning None ends the loop."""
        while time.perf_counter() < self.deadline:
            this = data() if callable(data) else data
            if this is None:
                return
            t0 = time.perf_counter()
            try:
                status, _, _ = await conn.request(this)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.errors += 1
                conn.close()
                await asyncio.sleep(retry_pause)
                continue
            t1 = time.perf_counter()
            if t1 <= self.deadline:
                self.latencies.append(t1 - t0)
                self.done_at.append(t1 - self.start)
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def summary(self, elapsed: float, expect: int) -> dict[str, Any]:
        bad = sum(n for s, n in self.statuses.items() if s != expect)
        return summary(self.latencies, elapsed, self.errors, bad, self.statuses)


async def closed(args: argparse.Namespace) -> dict[str, Any]:
    data = build_request("GET", args.path, args.header)
    tally = Tally(args.duration)

    async def worker() -> None:
        conn = Conn(args.host, args.port)
        try:
            await tally.loop(conn, data, 0.01)
        finally:
            conn.close()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.conns))), args.duration + 30)
    return tally.summary(time.perf_counter() - tally.start, args.expect)


async def paced(args: argparse.Namespace) -> dict[str, Any]:
    data = build_request("GET", args.path, args.header)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(args.conns):
        conn = Conn(args.host, args.port)
        await conn.open()
        idle.put_nowait(conn)
    tasks: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        nonlocal errors
        conn = await idle.get()
        try:
            status, _, _ = await conn.request(data)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn.close()
        else:
            latencies.append(time.perf_counter() - due)
            statuses[status] = statuses.get(status, 0) + 1
        finally:
            idle.put_nowait(conn)

    start = time.perf_counter()
    total = int(args.rate * args.duration)
    for k in range(total):
        due = start + k / args.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    elapsed = time.perf_counter() - start
    bad = sum(n for s, n in statuses.items() if s != args.expect)
    return summary(latencies, elapsed, errors, bad, statuses) | {"rate": args.rate}


async def xsrf_token(conn: Conn, headers: list[str]) -> str:
    """The _xsrf cookie that GET /login sets."""
    _, reply, _ = await conn.request(build_request("GET", "/login", headers))
    for name, value in reply:
        if name == b"set-cookie":
            jar = http.cookies.SimpleCookie()
            jar.load(value.decode())
            if "_xsrf" in jar:
                return jar["_xsrf"].value
    return ""


async def storm(args: argparse.Namespace) -> dict[str, Any]:
    emails = args.emails.split(",")
    clients = []
    for i in range(args.conns):
        conn = Conn(args.host, args.port)
        token = await xsrf_token(conn, args.header)
        body = urllib.parse.urlencode({"email": emails[i % len(emails)], "password": args.password,
                                       "_xsrf": token}).encode()
        data = build_request("POST", "/login", [*args.header, f"Cookie: _xsrf={token}",
                                               "Content-Type: application/x-www-form-urlencoded"], body)
        clients.append((conn, data))
    print("READY", flush=True)
    tally = Tally(args.duration)
    workers = [asyncio.ensure_future(tally.loop(c, d, 0.05)) for c, d in clients]
    await asyncio.sleep(args.duration)
    for w in workers:  # a login in flight at the deadline is not counted
        w.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.perf_counter() - tally.start
    for conn, _ in clients:
        conn.close()
    # Logins completed per second once every client is under way (the first second left out);
    # in steady state this is the server's login throughput.
    warm = min(1.0, args.duration / 4)
    steady = sum(1 for t in tally.done_at if t >= warm) / (args.duration - warm)
    return tally.summary(elapsed, args.expect) | {"rate_steady": steady}


async def flood(args: argparse.Namespace) -> dict[str, Any]:
    headers = [h for h in args.header if not h.lower().startswith("user-agent:")]
    conns = [Conn(args.host, args.port) for _ in range(args.conns)]
    token = await xsrf_token(conns[0], headers)
    if not token:
        raise RuntimeError("GET /login set no _xsrf cookie")
    body = urllib.parse.urlencode({"email": args.emails, "password": args.password, "_xsrf": token}).encode()
    fixed = [*headers, f"Cookie: _xsrf={token}", "Content-Type: application/x-www-form-urlencoded"]
    filler = "(KHTML, like Gecko) " * (args.ua_bytes // 20 + 1)
    sent = 0

    def attempt() -> bytes | None:
        nonlocal sent
        if args.count and sent >= args.count:
            return None
        sent += 1
        agent = f"Mozilla/5.0 (flood {sent:010d}; X11; Linux x86_64) AppleWebKit/537.36 {filler}"[:args.ua_bytes]
        return build_request("POST", "/login", [f"User-Agent: {agent}", *fixed], body)

    for conn in conns:
        await conn.open()
    print("READY", flush=True)
    tally = Tally(args.duration)
    workers = [asyncio.ensure_future(tally.loop(c, attempt, 0.05)) for c in conns]
    _, pending = await asyncio.wait(workers, timeout=args.duration)
    for w in pending:  # an attempt in flight at the deadline is not counted
        w.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.perf_counter() - tally.start
    for conn in conns:
        conn.close()
    return tally.summary(elapsed, args.expect) | {"sent": sent, "user_agent_bytes": args.ua_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("closed", "paced", "storm", "flood"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--expect", type=int, default=200)
    parser.add_argument("--emails", default="")
    parser.add_argument("--password", default="")
    parser.add_argument("--count", type=int, default=0, help="flood: stop after this many attempts (0: no limit)")
    parser.add_argument("--ua-bytes", type=int, default=2048, help="flood: size of each User-Agent")
    args = parser.parse_args()
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner({"closed": closed, "paced": paced, "storm": storm, "flood": flood}[args.mode](args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
