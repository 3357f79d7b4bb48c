"""Live follow (SSE) and the dashboard."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import urllib.parse

import pytest

from conftest import Browser, admin_browser, read_events, register_admin, serving
from sessionaudit import keys
from sessionaudit.app import make_app

pytestmark = pytest.mark.gen_test(timeout=30)


class SSE:
    """A raw EventSource: one socket, so closing it is exactly a closed tab."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int):
        self.reader, self.writer, self.status = reader, writer, status
        self.comments: list[str] = []

    @classmethod
    async def open(cls, base_url: str, browser: Browser, path: str = "/admin/audit/live",
                   last_event_id: str | None = None, receive_buffer: int | None = None) -> SSE:
        port = int(urllib.parse.urlsplit(base_url).port or 80)
        sock = socket.socket()
        if receive_buffer:  # a client that reads slowly, or not at all, takes little off the server
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        cookies = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nCookie: {cookies}\r\n"
                     f"Accept: text/event-stream\r\n{extra}\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"transfer-encoding: chunked"):
                chunked = True
        sse = cls(reader, writer, status)
        sse.chunked = chunked
        sse.buffer = ""
        return sse

    async def _more(self) -> bool:
        if self.chunked:
            size_line = await self.reader.readline()
            if not size_line:
                return False
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return False
            data = await self.reader.readexactly(size + 2)
            self.buffer += data[:-2].decode()
        else:
            data = await self.reader.read(65536)
            if not data:
                return False
            self.buffer += data.decode()
        return True

    async def message(self) -> tuple[str, dict] | None:
        """The next message (id, data), skipping comments; None when the stream ends."""
        while True:
            while "\n\n" not in self.buffer:
                if not await self._more():
                    return None
            block, self.buffer = self.buffer.split("\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif ":" in line:
                    name, value = line.split(":", 1)
                    fields[name] = value.strip()
            if "data" in fields:
                assert "event" not in fields  # unnamed, so EventSource.onmessage gets it
                return fields["id"], json.loads(fields["data"])

    def close(self) -> None:
        self.writer.close()


async def test_follower_sees_login_and_logout_as_they_happen(new_browser, rdb, base_url, app) -> None:
    admin = await admin_browser(new_browser, rdb, "watch@example.com")
    stream = await SSE.open(base_url, admin)
    assert stream.status == 200
    other = new_browser()
    await other.register("live@example.com")
    await other.logout()
    got = [await stream.message() for _ in range(3)]
    assert [m[1]["type"] for m in got] == ["register", "login", "logout"]
    assert all(m[1]["user"] == "live@example.com" for m in got)
    events = await read_events(rdb)
    assert [m[0] for m in got] == [e.id for e in events[-3:]]
    assert got[1][1] == events[-2].to_json()  # the same object as the export
    stream.close()


async def test_filters_are_honoured(new_browser, rdb, base_url) -> None:
    admin = await admin_browser(new_browser, rdb, "watch@example.com")
    stream = await SSE.open(base_url, admin, "/admin/audit/live?type=logout&user=b%40example.com")
    for email in ("a@example.com", "b@example.com"):
        b = new_browser()
        await b.register(email)
        await b.logout()
    message = await stream.message()
    assert message and message[1]["type"] == "logout" and message[1]["user"] == "b@example.com"
    stream.close()


async def test_last_event_id_resumes_with_nothing_missed(new_browser, rdb, base_url) -> None:
    admin = await admin_browser(new_browser, rdb, "watch@example.com")
    first = await SSE.open(base_url, admin)
    user = new_browser()
    await user.register("resume@example.com")
    seen = await first.message()
    assert seen
    first.close()  # the connection drops...
    await user.logout()  # ...events happen meanwhile...
    await user.login("resume@example.com")
    again = await SSE.open(base_url, admin, last_event_id=seen[0])  # ...and EventSource reconnects
    await user.logout()
    got = [await again.message() for _ in range(4)]
    assert [m[1]["type"] for m in got] == ["login", "logout", "login", "logout"]
    ids = [e.id for e in await read_events(rdb)]
    assert [m[0] for m in got] == ids[ids.index(seen[0]) + 1:]
    again.close()


async def test_heartbeat_closed_tab_cap_and_one_reader(http_client, rdb, clock, settings, redis_url) -> None:
    settings = dataclasses.replace(settings, live_heartbeat=0.05, max_followers=2)
    app = make_app(settings, rdb, clock)
    async with serving(app) as base:
        admin = Browser(http_client, base)
        await register_admin(admin, rdb, "hb@example.com")
        one = await SSE.open(base, admin)
        two = await SSE.open(base, admin)
        third = await SSE.open(base, admin)
        assert third.status == 503  # past the cap
        third.close()
        while len(one.comments) < 3:  # heartbeats arrive while nothing happens
            await one._more()
            while "\n\n" in one.buffer:
                block, one.buffer = one.buffer.split("\n\n", 1)
                one.comments += [line for line in block.split("\n") if line.startswith(": heartbeat")]
        # Two followers, one blocked XREAD on Redis.
        clients = (await rdb.execute_command("CLIENT", "LIST")).decode()
        assert len(re.findall(r"cmd=xread", clients)) == 1
        one.close()  # a closed tab ends its follower at once
        for _ in range(200):
            if len(app.ctx.live.followers) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(app.ctx.live.followers) == 1
        await app.ctx.close_followers()  # shutdown ends the remaining stream
        assert await two.message() is None
        assert len(app.ctx.live.followers) == 0
        two.close()


async def test_live_is_admin_only(browser: Browser, base_url) -> None:
    await browser.register("nope@example.com")
    stream = await SSE.open(base_url, browser)
    assert stream.status == 403
    stream.close()


async def test_dashboard_counts_and_charts(new_browser, rdb, clock) -> None:
    admin = await admin_browser(new_browser, rdb, "dash@example.com")
    user = new_browser()
    await user.register("d1@example.com")
    await user.logout()
    for _ in range(2):
        await new_browser().login("d1@example.com", "not it not it not it")
    page = await admin.get("/admin")
    assert page.code == 200
    body = page.body.decode()
    assert re.search(r'id="stat-live">1<', body)  # the admin's own session
    assert re.search(r'id="stat-logins">2<', body)
    assert re.search(r'id="stat-failures">2<', body)
    assert "127.0.0.1</td><td>2</td>" in body
    assert body.count('<svg class="chart"') == 2 and "<title id=\"chart-hours-title\">" in body
    assert "Failed sign-ins (2)" in body and "Sign-ins (2)" in body
    assert "<script" not in body  # charts are drawn on the server
    clock.advance(2 * 3600)  # the failures leave the last hour (the admin's session has idled out: log in again)
    assert (await admin.login("dash@example.com")).code == 303
    later = (await admin.get("/admin")).body.decode()
    assert re.search(r'id="stat-failures">0<', later)


async def test_user_timeline_draws_session_bars(new_browser, rdb, clock) -> None:
    admin = await admin_browser(new_browser, rdb, "bars@example.com")
    user = new_browser()
    await user.register("b1@example.com")
    clock.advance(60)
    await user.logout()
    await user.login("b1@example.com")
    page = (await admin.get("/admin/users/2")).body.decode()
    assert 'class="bar bar-logout"' in page and 'class="bar bar-live"' in page
    assert "Sessions over time" in page


async def test_stream_stops_when_the_followers_session_ends(http_client, rdb, clock, settings) -> None:
    """Following is not activity, and an ended session stops receiving at the next check."""
    settings = dataclasses.replace(settings, live_heartbeat=0.05, live_recheck=0.1)
    app = make_app(settings, rdb, clock)
    async with serving(app) as base:
        admin = Browser(http_client, base)
        await register_admin(admin, rdb, "end@example.com")
        stream = await SSE.open(base, admin)
        assert stream.status == 200
        laptop = Browser(http_client, base)
        await laptop.login("end@example.com")  # the same admin elsewhere ends the following session
        await laptop.post("/account/sessions/revoke-others")
        seen = []
        while (message := await stream.message()) is not None:  # the laptop's login, the revocation...
            seen.append(message[1]["type"])
        assert seen == ["login", "revoked"]  # ...and then the stream ended
        stream.close()


async def test_a_removed_admin_is_cut_off_however_busy_the_trail(http_client, rdb, clock, settings) -> None:
    """The attack: keep the trail busy (anonymous failed logins) so that no heartbeat wait ever times
    out, and keep receiving every event after losing admin rights. The check runs on its own timer."""
    settings = dataclasses.replace(settings, live_heartbeat=15.0, live_recheck=0.2)
    app = make_app(settings, rdb, clock)
    async with serving(app) as base:
        admin = Browser(http_client, base)
        await register_admin(admin, rdb, "demoted@example.com")
        boss = Browser(http_client, base)
        await register_admin(boss, rdb, "boss@example.com")
        stream = await SSE.open(base, admin)
        assert stream.status == 200
        assert (await boss.post("/admin/users/1/unadmin")).code == 303
        noise = Browser(http_client, base)
        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            await noise.login("ghost@example.com", "wrong wrong wrong")  # an event every few ms
            try:
                message = await asyncio.wait_for(stream.message(), 0.5)
            except TimeoutError:
                continue
            if message is None:
                break
            received += 1
        else:
            pytest.fail("the demoted admin's stream was never cut off")
        assert loop.time() < deadline
        reconnect = await SSE.open(base, admin)
        assert reconnect.status == 403  # and following again is refused
        reconnect.close()
        stream.close()


async def append_failed_logins(rdb, clock, n: int, user_agent: str) -> None:
    """A trail of ``n`` failed logins, appended inside Redis (fast), each with ``user_agent``."""
    await keys.Script(rdb, """
for i = 1, tonumber(ARGV[2]) do
  emit(tonumber(ARGV[1]), {t = 'login_failed', e = 'x@example.com', i = '10.0.0.1', g = ARGV[3],
                           r = 'bad_credentials'})
end
return 1""")([int(clock() * 1000), n, user_agent])


async def test_resuming_from_the_start_does_not_buffer_the_trail(http_client, rdb, clock, settings) -> None:
    """A follower that resumes from the oldest event and does not read: the server reads the trail
    only as fast as the client takes it, and lets go of a client that takes nothing."""
    settings = dataclasses.replace(settings, write_timeout=3.0)
    app = make_app(settings, rdb, clock)
    async with serving(app) as base:
        admin = Browser(http_client, base)
        await register_admin(admin, rdb, "reader@example.com")
        first = (await read_events(rdb))[0].id
        await append_failed_logins(rdb, clock, 20_000, "Mozilla/5.0 " + "x" * 500)  # about 15 MB of messages
        await rdb.config_resetstat()
        stream = await SSE.open(base, admin, last_event_id=first, receive_buffer=4096)
        assert stream.status == 200

        async def replay_reads() -> int:
            stats = await rdb.info("commandstats")
            return stats.get("cmdstat_xrange", {}).get("calls", 0)

        # The client reads nothing: the replay stops after what the socket buffers hold.
        stalled, previous = 0, -1
        while stalled < 5:
            await asyncio.sleep(0.2)
            now = await replay_reads()
            stalled = stalled + 1 if now == previous else 0
            previous = now
        assert previous <= 16, f"read {previous} of 41 chunks for a client that took nothing"
        # ...and after the write timeout the server lets go of it.
        for _ in range(100):
            if not app.ctx.live.followers:
                break
            await asyncio.sleep(0.1)
        assert not app.ctx.live.followers
        stream.close()
        # A client that does read gets all of it, in order.
        reading = await SSE.open(base, admin, last_event_id=first)
        got = 0
        while got < 20_001:
            message = await reading.message()
            assert message is not None
            got += 1
        assert message[1]["type"] == "login_failed" and message[1]["user_agent"].startswith("Mozilla/5.0 xxx")
        reading.close()
