"""Redis that fails over: a primary, two replicas and three Sentinels on loopback (tests/redis_ha.py).

The primary is killed with SIGKILL. Pages answer 503 (never 500) meanwhile and work again without a
restart; state changes wait for replicas (--redis-wait-replicas) so nothing acknowledged is lost;
logins, logouts and expiries near the failover are each recorded once; event ids never repeat or
step back; the live reader, the sweeper, the server process and the commands follow by themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import tornado.web

from conftest import PASSWORD, Browser, FakeClock, read_events, register_admin, scripts_run, serving, test_settings
from process import Site, run, status, wait_until
from redis_ha import MASTER, Cluster, HAUnavailable, make_certificates
from sessionaudit import events, keys, redisconn
from sessionaudit.app import make_app
from sessionaudit.audit import AuditLog
from sessionaudit.cli import check_redis, main
from sessionaudit.config import Settings
from sessionaudit.handlers.base import NOT_REPLICATED
from sessionaudit.sessions import SessionStore
from sessionaudit.sweeper import Sweeper
from sessionaudit.users import UserStore
from test_live import SSE

pytestmark = pytest.mark.gen_test(timeout=90)


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    try:
        ha = Cluster(tmp_path / "ha").start()
    except HAUnavailable as e:
        pytest.skip(str(e))
    yield ha
    ha.stop()


def ha_settings(cluster: Cluster, **overrides: Any) -> Settings:
    return test_settings(redis_sentinel=cluster.sentinel_option, redis_sentinel_master=MASTER, **overrides)


def ha_app(cluster: Cluster, clock: FakeClock, **overrides: Any) -> tuple[aioredis.Redis, tornado.web.Application]:
    """The site's Sentinel-managed client (the caller closes it) and the app on it (settings in app.ctx)."""
    settings = ha_settings(cluster, **overrides)
    client = redisconn.connect(settings)
    return client, make_app(settings, client, clock)


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 30.0, what: str = "it") -> Any:
    """Await ``check()`` every 50 ms until it returns something true (Redis errors meanwhile count as no)."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = await check()
            if result:
                return result
        except redisconn.UNAVAILABLE:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def trail(client: aioredis.Redis) -> list[events.Event]:
    """The whole audit trail as the current primary has it (waiting out a failover)."""
    return await eventually(lambda: _nonempty(read_events(client)), what="the audit trail")


async def _nonempty(found: Awaitable[list[events.Event]]) -> list[events.Event] | None:
    return (await found) or None


def ends_by_session(found: list[events.Event]) -> Counter[str]:
    return Counter(e.session for e in found if e.type in (events.LOGOUT, events.EXPIRED, events.REVOKED))


async def test_pages_answer_503_during_a_failover_and_recover_without_a_restart(cluster, http_client) -> None:
    clock = FakeClock()
    client, app = ha_app(cluster, clock, redis_wait_replicas=1, redis_wait_timeout=1.0)
    settings = app.ctx.settings
    sweeper = Sweeper(app.ctx.sessions, app.ctx.audit, clock, interval=0.05)
    try:
        async with serving(app) as base:
            admin, user = Browser(http_client, base), Browser(http_client, base)
            await register_admin(admin, client, "admin@example.com")
            follower = await SSE.open(base, admin)
            assert (await user.register("user@example.com")).code == 303
            before = [(await follower.message())[0] for _ in range(2)]  # its register and login
            login_script = app.ctx.factors.scripts.password_login.sha
            for port in cluster.replica_ports:  # scripts are not replicated: a new primary lacks them
                with cluster.client(port) as replica:
                    assert replica.script_exists(login_script) == [False]
            sweeper.start()

            seen: list[tuple[str, int, bytes]] = []
            recovered = asyncio.Event()

            async def keep_loading(path: str) -> None:
                while not recovered.is_set():
                    page = await (user if path == "/account" else Browser(http_client, base)).get(path)
                    seen.append((path, page.code, page.body))
                    await asyncio.sleep(0.02)

            loaders = [asyncio.ensure_future(keep_loading(p)) for p in ("/account", "/healthz")]
            # Requests in flight: waiting for Redis to answer their script when the primary dies.
            cluster.pause_writes(10_000)
            in_flight = [asyncio.ensure_future(user.get("/account")) for _ in range(10)]
            await eventually(lambda: _true(app.ctx.in_flight >= 10), what="requests waiting for Redis")
            killed_at = time.monotonic()
            old = cluster.kill_primary()
            answered = await asyncio.gather(*in_flight)
            in_flight_seconds = time.monotonic() - killed_at

            async def account_page() -> bool:
                return any(p == "/account" and c == 200 for p, c, _ in seen[-2:])

            await eventually(account_page, what="a good page")
            first_good_page = time.monotonic() - killed_at
            await eventually(lambda: _ok(user.get("/healthz")), what="/healthz 200")
            recovered.set()
            await asyncio.gather(*loaders)

            # Pages answered 503 with the plain error page meanwhile, never 500; requests in flight too.
            assert {code for _, code, _ in seen} == {200, 503}
            assert {code for p, code, _ in seen if p == "/healthz"} == {200, 503}
            assert {r.code for r in answered} == {503} and in_flight_seconds < 5
            for path, code, body in seen:
                if code == 503 and path == "/account":
                    assert b"Temporarily unavailable" in body and b"Traceback" not in body

            # State changes work again once the new primary has its replica (the other one).
            login_again = await eventually(lambda: _code(Browser(http_client, base).login("user@example.com"), 303),
                                           what="a login on the new primary")
            first_good_login = time.monotonic() - killed_at
            assert login_again
            new = cluster.primary_port()
            assert new != old
            with cluster.client(new) as primary:
                assert primary.script_exists(login_script) == [True]  # sent again after NOSCRIPT
                # The page's function (Redis 7) came with replication, or was loaded again.
                page = app.ctx.sessions.scripts.touch.function
                assert not page or primary.function_list(library=page)
            assert (await user.get("/account")).code == 200  # still logged in: the session was replicated
            assert (await user.logout()).code == 303

            # The live reader followed: the follower gets what happens on the new primary.
            got = [await follower.message() for _ in range(2)]
            assert [m[1]["type"] for m in got] == ["login", "logout"]
            assert all(_id(m[0]) > _id(before[-1]) for m in got)
            follower.close()

            # The sweeper followed: the admin's session expires, recorded once.
            clock.advance(settings.session_idle + 1)
            await eventually(lambda: _expired(client, 1), what="the admin's expiry")
            assert not sweeper.failing
            found = await trail(client)
            assert max(ends_by_session(found).values()) == 1
            assert not (await AuditLog(client).verify()).problems
            print(f"\nfailover: SIGKILL of the primary to the first good page {first_good_page:.2f} s, "
                  f"to the first good login (WAIT 1) {first_good_login:.2f} s; requests in flight at the kill: "
                  f"{sorted(r.code for r in answered)} within {in_flight_seconds:.2f} s")
    finally:
        await sweeper.stop()
        await client.aclose()


async def test_nothing_acknowledged_is_lost_and_each_event_is_recorded_once(cluster, http_client) -> None:
    clock = FakeClock()
    client, app = ha_app(cluster, clock, redis_wait_replicas=1, redis_wait_timeout=1.0)
    settings = app.ctx.settings
    sweeper = Sweeper(app.ctx.sessions, app.ctx.audit, clock, interval=0.02)

    def ref(cookie: str) -> str:
        """The session's name in the trail, from the browser's signed cookie."""
        session_id = tornado.web.decode_signed_value(settings.cookie_secret, "sid", cookie, min_version=2)
        return app.ctx.sessions.ref(session_id.decode())

    try:
        async with serving(app) as base:
            idle = [Browser(http_client, base) for _ in range(6)]  # their sessions expire at the failover
            for i, b in enumerate(idle):
                assert (await b.register(f"idle{i}@example.com")).code == 303
            churners = [Browser(http_client, base) for _ in range(4)]
            for i, b in enumerate(churners):
                assert (await b.register(f"churn{i}@example.com")).code == 303
                assert (await b.logout()).code == 303
            idle_refs = [ref(b.cookies["sid"]) for b in idle]
            acked_logins: list[str] = []
            acked_logouts: list[str] = []
            stop = asyncio.Event()

            async def churn(b: Browser, email: str) -> None:
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    if "_xsrf" not in b.cookies and (await b.get("/login")).code != 200:
                        continue  # a 503: the form's page loads the session, which needs Redis
                    if "sid" not in b.cookies:
                        if (await b.login(email)).code == 303:
                            acked_logins.append(ref(b.cookies["sid"]))
                    else:
                        sid = b.cookies["sid"]
                        if (await b.logout()).code == 303:
                            acked_logouts.append(ref(sid))

            sweeper.start()
            workers = [asyncio.ensure_future(churn(b, f"churn{i}@example.com")) for i, b in enumerate(churners)]
            await eventually(lambda: _at_least(acked_logouts, 8), what="some logins and logouts")
            clock.advance(settings.session_idle + 1)  # the idle sessions fall due now...
            await eventually(lambda: _expired(client, 1), what="the first expiries")
            cluster.kill_primary()  # ...and the primary dies with expiries, logins and logouts in flight
            at_kill = len(acked_logins)
            await eventually(lambda: _at_least(acked_logins, at_kill + 8), what="logins on the new primary")
            stop.set()
            await asyncio.gather(*workers)
            await eventually(lambda: _none_due(client, clock), what="the sweeper to catch up")

            found = await trail(client)
            logins = Counter(e.session for e in found if e.type == events.LOGIN)
            ends = ends_by_session(found)
            # Nothing acknowledged is lost: every login and logout that was answered is there.
            assert all(logins[r] == 1 for r in acked_logins), "an acknowledged login is missing"
            assert all(ends[r] == 1 for r in acked_logouts), "an acknowledged logout is missing"
            # Each event once: one login per session, at most one end; the idle sessions expired once.
            assert set(logins.values()) == {1} and set(ends.values()) == {1}
            assert [e.type for e in found if e.session in idle_refs and e.type != events.LOGIN] == ["expired"] * 6
            ids = [_id(e.id) for e in found]
            assert ids == sorted(set(ids))
            assert not (await AuditLog(client).verify()).problems
            # After all those concurrent look-ups of the primary, the site still asks all three Sentinels.
            manager = client.connection_pool.sentinel_manager
            asked = [s.connection_pool.connection_kwargs["port"] for s in manager.sentinels]
            assert sorted(asked) == sorted(cluster.sentinel_ports)
    finally:
        await sweeper.stop()
        await client.aclose()


async def test_a_new_primary_that_lost_the_last_events_never_reuses_their_ids(cluster, http_client) -> None:
    """Without --redis-wait-replicas an answered login can be lost; the ids after it still only grow."""
    clock = FakeClock()  # frozen: the new primary's ids cannot move past the lost ones by the clock alone
    client, app = ha_app(cluster, clock)
    try:
        async with serving(app) as base:
            admin = Browser(http_client, base)
            await register_admin(admin, client, "admin@example.com")
            follower = await SSE.open(base, admin)
            cluster.cut_replication()
            lost = Browser(http_client, base)
            assert (await lost.register("lost@example.com")).code == 303  # answered at once, never replicated
            seen = [await follower.message() for _ in range(2)]
            assert [m[1]["user"] for m in seen] == ["lost@example.com"] * 2
            old = cluster.kill_primary()
            await asyncio.to_thread(cluster.wait_failover, old)

            later = Browser(http_client, base)
            await eventually(lambda: _code(later.register("later@example.com"), 303), what="a registration")
            found = await trail(client)
            assert "lost@example.com" not in {e.user for e in found}  # what --redis-wait-replicas prevents
            new_ids = [e.id for e in found if e.user == "later@example.com"]
            assert min(_id(i) for i in new_ids) > _id(seen[-1][0])
            # The live reader followed the failover, and the follower gets the new events: none has
            # an id it has already seen (it would skip them as old).
            got = [await follower.message() for _ in range(2)]
            assert [m[0] for m in got] == new_ids
            follower.close()
            # A browser that resumes from the lost id misses nothing either.
            resumed = await SSE.open(base, admin, last_event_id=seen[-1][0])
            assert [(await resumed.message())[0] for _ in range(2)] == new_ids
            resumed.close()
    finally:
        await client.aclose()


async def test_a_planned_failover_is_followed_by_every_connection(cluster, http_client) -> None:
    """SENTINEL FAILOVER (maintenance): the old primary stays up, a primary still until the Sentinels
    turn it into a replica up to 10 s later. The site's connections move off it at once, the live
    reader's blocked XREAD too, so nothing is written where it would be lost."""
    clock = FakeClock()
    client, app = ha_app(cluster, clock, redis_wait_replicas=1, redis_wait_timeout=1.0)
    watch = redisconn.PrimaryWatch(client, interval=0.2)
    watch.start()
    try:
        async with serving(app) as base:
            admin, user = Browser(http_client, base), Browser(http_client, base)
            await register_admin(admin, client, "admin@example.com")
            follower = await SSE.open(base, admin)
            assert (await user.register("user@example.com")).code == 303
            assert [(await follower.message())[1]["type"] for _ in range(2)] == ["register", "login"]
            old = cluster.planned_failover()
            new = await asyncio.to_thread(cluster.wait_failover, old)

            def site_connections(port: int) -> int:
                with cluster.client(port) as node:
                    listed = node.execute_command("CLIENT", "LIST").decode().splitlines()
                return sum(1 for c in listed if any(f"cmd={cmd}" in c for cmd in ("evalsha", "fcall", "xread")))

            await eventually(lambda: asyncio.to_thread(lambda: site_connections(old) == 0), within=8,
                             what="the site's connections to leave the old primary")
            assert (await user.get("/account")).code == 200
            assert (await user.logout()).code == 303
            assert (await user.login("user@example.com")).code == 303
            with cluster.client(new) as primary:  # written where they stay
                assert [e[1][b"t"] for e in primary.xrange(keys.AUDIT)][-2:] == [b"logout", b"login"]
            got = [await follower.message() for _ in range(2)]
            assert [m[1]["type"] for m in got] == ["logout", "login"]
            def reading(port: int) -> bool:
                with cluster.client(port) as node:
                    return "cmd=xread" in node.execute_command("CLIENT", "LIST").decode()

            await eventually(lambda: asyncio.to_thread(reading, new), what="the reader on the new primary")
            assert not reading(old)
            follower.close()
    finally:
        await watch.stop()
        await client.aclose()


async def test_state_changes_wait_for_replicas_and_page_views_do_not(cluster, http_client) -> None:
    clock = FakeClock()
    client, app = ha_app(cluster, clock, redis_wait_replicas=1, redis_wait_timeout=1.0)
    try:
        async with serving(app) as base:
            b = Browser(http_client, base)
            assert (await b.register("wait@example.com")).code == 303
            assert (await b.logout()).code == 303  # every script used below is loaded now
            assert (await b.login("wait@example.com")).code == 303
            assert (await b.get("/account")).code == 200
            with cluster.primary_client() as primary:
                before = primary.info("commandstats")
                for _ in range(5):
                    assert (await b.get("/account")).code == 200
                assert (await b.logout()).code == 303
                assert (await b.login("wait@example.com")).code == 303
                after = primary.info("commandstats")
            waits = after["cmdstat_wait"]["calls"] - before.get("cmdstat_wait", {}).get("calls", 0)
            calls = {"scripts": scripts_run(after) - scripts_run(before), "wait": waits}
            # A page view: its one script, no WAIT. The logout: the page's script, then the END script
            # with its WAIT. The login: the throttle check (which records a refusal when it refuses, so
            # it waits too), then the LOGIN script with its WAIT.
            assert calls == {"scripts": 5 + 2 + 2, "wait": 1 + 2}
            login = [e for e in await read_events(client) if e.type == events.LOGIN][-1]
            replicas_with_it = 0
            for port in cluster.replica_ports:  # read right after the answer: it is there already
                with cluster.client(port) as replica:
                    replicas_with_it += len(replica.xrange(keys.AUDIT, login.id, login.id))
            assert replicas_with_it >= 1

            # At start the operator is told when fewer replicas are connected than state changes wait for.
            assert not [w for w in await check_redis(client, 2) if "replica" in w]
            assert any("2 replica(s) connected and redis_wait_replicas is 3" in w for w in await check_redis(client, 3))

            cluster.cut_replication()
            started = time.monotonic()
            refused = await Browser(http_client, base).login("wait@example.com")
            assert refused.code == 503 and time.monotonic() - started >= 1.0
            assert NOT_REPLICATED.split(":")[0].encode() in refused.body and b"Traceback" not in refused.body
            assert (await b.get("/account")).code == 200  # page views need no replica
            assert (await b.logout()).code == 503  # not confirmed: it may or may not have happened...
            cluster.restore_replication()
            assert (await b.get("/account")).code == 302  # ...here it did, on the primary
            assert (await b.login("wait@example.com")).code == 303
    finally:
        await client.aclose()


def test_server_and_commands_follow_password_protected_sentinels(tmp_path: Path) -> None:
    """The real process: found through Sentinels that, like the data nodes, need a password."""
    secrets = {"REDIS_PASSWORD": "data-node-secret-9f3a", "REDIS_SENTINEL_PASSWORD": "sentinel-secret-77c1"}
    try:
        ha = Cluster(tmp_path / "ha", password=secrets["REDIS_PASSWORD"],
                     sentinel_password=secrets["REDIS_SENTINEL_PASSWORD"]).start()
    except HAUnavailable as e:
        pytest.skip(str(e))
    env = {"REDIS_SENTINEL": ha.sentinel_option, "REDIS_SENTINEL_MASTER": MASTER, "REDIS_WAIT_REPLICAS": "1",
           **secrets}
    site = None
    try:
        made = run("create-user", "--email=ops@example.com", "--admin", stdin=PASSWORD + "\n", **env)
        assert made.returncode == 0, made.stderr
        site = Site(tmp_path, **env)
        old = ha.kill_primary()
        killed_at = time.monotonic()
        assert wait_until(lambda: status(site.url + "/healthz") == 503)
        assert wait_until(lambda: status(site.url + "/healthz") == 200, timeout=30)
        back_after = time.monotonic() - killed_at
        ha.wait_failover(old)
        ha.wait_replicas_synced(count=1)
        made = run("create-user", "--email=dev@example.com", stdin=PASSWORD + "\n", **env)
        assert made.returncode == 0, made.stderr
        verify = run("audit", "verify", f"--data-dir={tmp_path}", **env)  # the site's: its seal key
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "register: 2" in verify.stdout
        assert site.stop() == 0
        out = site.output()
        assert f"primary '{MASTER}' through Sentinel {ha.sentinel_option}" in out
        for secret in secrets.values():
            assert secret not in out + made.stdout + made.stderr + verify.stdout
        print(f"\nserver process: /healthz 200 again {back_after:.2f} s after SIGKILL of the primary")
    finally:
        if site and site.proc.poll() is None:
            site.output()
        ha.stop()


async def test_tls_to_the_sentinels_and_to_the_servers_they_name(tmp_path: Path, http_client) -> None:
    """Both legs over TLS with a client certificate: the Sentinels (sentinel_kwargs) and the primary."""
    certs = make_certificates(tmp_path / "tls")
    if certs is None:
        pytest.skip("no openssl to make test certificates")
    try:
        ha = Cluster(tmp_path / "ha", replicas=1, tls=certs).start()
    except HAUnavailable as e:
        pytest.skip(str(e))
    settings = ha_settings(ha, redis_tls_ca=str(certs / "ca.pem"), redis_tls_cert=str(certs / "client.pem"),
                           redis_tls_key=str(certs / "client.key"))
    settings.validate()
    client = redisconn.connect(settings)
    try:
        async with serving(make_app(settings, client, FakeClock())) as base:
            b = Browser(http_client, base)
            assert (await b.register("tls@example.com")).code == 303
            assert (await b.get("/account")).code == 200
        assert [e.type for e in await read_events(client)] == ["register", "login"]
    finally:
        await client.aclose()
        ha.stop()


@pytest.mark.parametrize("args,message", [
    (["--redis-sentinel=127.0.0.1:26379"], "needs --redis-sentinel-master"),
    (["--redis-sentinel=127.0.0.1:26379", "--redis-sentinel-master=sa", "--redis-url=redis://h/0"], "not both"),
    (["--redis-sentinel=localhost", "--redis-sentinel-master=sa"], "expected host:port"),
    (["--redis-sentinel=h:1,h:70000", "--redis-sentinel-master=sa"], "expected host:port"),
    (["--redis-password=secret"], "apply to Redis found through --redis-sentinel"),
    (["--redis-sentinel=h:1", "--redis-sentinel-master=sa", "--redis-tls-ca=/no/such/ca.pem"], "cannot read"),
    (["--redis-sentinel=h:1", "--redis-sentinel-master=sa", "--redis-tls-cert=/etc/hostname"], "go together"),
    (["--redis-wait-replicas=-1"], "--redis-wait-replicas"),
    (["--redis-wait-replicas=1"], "the embedded one has none"),
    (["--redis-wait-replicas=two"], "--redis-wait-replicas"),
    (["--redis-wait-timeout=30"], "--redis-wait-timeout"),
])
def test_bad_redis_options_stop_the_start_with_a_clear_message(args: list[str], message: str, capsys) -> None:
    assert main(args, environ={}) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "secret" not in err


async def test_a_script_run_twice_records_its_event_once(rdb, clock) -> None:
    """A client that retries after a lost reply (redis-py does, on a dropped connection) runs a
    script twice: a registration and a login are still recorded once."""
    settings = test_settings()
    users = UserStore(rdb, clock)
    register = [int(clock() * 1000), "twice@example.com", "$argon2id$stand-in", "0", "127.0.0.1", "test"]
    uid = await users.scripts.register(args=register)
    assert await users.scripts.register(args=register) == uid
    store = SessionStore(rdb, settings.session_keys(), clock, idle=300, lifetime=3600)
    _, _, args = store.login_args(uid.decode(), "twice@example.com", ip="127.0.0.1", user_agent="test")
    login = [int(clock() * 1000), *args]
    assert await store.scripts.login(args=login) == await store.scripts.login(args=login) == b"twice@example.com"
    assert [e.type for e in await read_events(rdb)] == ["register", "login"]


async def _true(value: bool) -> bool:
    return value


async def _ok(response: Awaitable[Any]) -> bool:
    return (await response).code == 200


async def _code(response: Awaitable[Any], code: int) -> bool:
    return (await response).code == code


async def _expired(client: aioredis.Redis, count: int) -> bool:
    return sum(1 for e in await read_events(client) if e.type == events.EXPIRED) >= count


async def _at_least(items: list[str], count: int) -> bool:
    return len(items) >= count


async def _none_due(client: aioredis.Redis, clock: FakeClock) -> bool:
    return not await client.zrangebyscore(keys.DEADLINES, "-inf", int(clock() * 1000))


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)

