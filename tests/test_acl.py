"""The two Redis ACL users of docs/redis-users.acl, on a real Redis 7 loaded with that very file.

The site works as `sessionaudit` but cannot delete, trim or overwrite the audit trail, neither by
command nor from a script; `detect_mode` tells the users apart; `sessionaudit-maint` runs the
retention script.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from conftest import ROOT, Browser, emptied, make_admin, read_events, test_settings
from sessionaudit import keys
from sessionaudit.acl import APPEND_ONLY, FULL, detect_mode
from sessionaudit.app import make_app
from sessionaudit.audit import AuditLog
from sessionaudit.cli import audit_command, check_redis
from sessionaudit.redis_server import RedisServer, RedisServerError, find_redis_server
from sessionaudit.seal import verify_redis

ACL_FILE = ROOT / "docs" / "redis-users.acl"
PASSWORDS = {"SITE": "site-test-password", "MAINT": "maint-test-password", "ADMIN": "admin-test-password"}
SITE_USER, MAINT_USER = "sessionaudit", "sessionaudit-maint"


def _redis_version() -> tuple[int, ...] | None:
    try:
        out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, check=True).stdout
    except (RedisServerError, OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else None


VERSION = _redis_version()

pytestmark = [
    pytest.mark.gen_test,
    pytest.mark.skipif(VERSION is None or VERSION < (7, 0),
                       reason=f"ACL selectors need redis-server >= 7.0; found {VERSION or 'none'} "
                              "(apt-get install redis-server)"),
]


def write_acl_file(path: Path) -> None:
    """docs/redis-users.acl with test passwords, and a default user that fixtures can flush with."""
    text = ACL_FILE.read_text()
    for name, password in PASSWORDS.items():
        text = text.replace(f"#{name}_PASSWORD_SHA256", "#" + hashlib.sha256(password.encode()).hexdigest())
    lines = [line for line in text.splitlines() if not line.startswith("user default ")]
    path.write_text("\n".join(["user default on nopass ~* &* +@all", *lines]) + "\n")


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("redis-acl")
    write_acl_file(workdir / "users.acl")
    server = RedisServer.ephemeral(workdir, extra=["--aclfile", str(workdir / "users.acl")]).start()
    yield server
    server.stop()


def url_for(server: RedisServer, user: str, password: str) -> str:
    return server.url.replace("redis://", f"redis://{user}:{password}@", 1)


@pytest.fixture
def admin_url(acl_server: RedisServer) -> str:
    """The default user's URL, on an empty database."""
    return emptied(acl_server.url)


def _client(url: str, io_loop: Any) -> Any:
    client = aioredis.Redis.from_url(url)
    yield client
    io_loop.run_sync(client.aclose)


@pytest.fixture
def admin(admin_url: str, io_loop: Any) -> Any:
    yield from _client(admin_url, io_loop)


@pytest.fixture
def site(admin_url: str, acl_server: RedisServer, io_loop: Any) -> Any:
    yield from _client(url_for(acl_server, SITE_USER, PASSWORDS["SITE"]), io_loop)


@pytest.fixture
def maint_url(admin_url: str, acl_server: RedisServer) -> str:
    return url_for(acl_server, MAINT_USER, PASSWORDS["MAINT"])


@pytest.fixture
def maint(maint_url: str, io_loop: Any) -> Any:
    yield from _client(maint_url, io_loop)


@pytest.fixture
def app(settings: Any, site: aioredis.Redis, clock: Any) -> Any:
    """The site on the append-only user (overrides conftest's app for this module)."""
    application = make_app(settings, site, clock)
    yield application
    application.ctx.close()


async def _audit_snapshot(admin: aioredis.Redis) -> dict[bytes, list[Any]]:
    snapshot: dict[bytes, Any] = {}
    for key in sorted(await admin.keys("audit:*")):
        kind = await admin.type(key)
        snapshot[key] = await (admin.xrange(key) if kind == b"stream" else admin.hgetall(key))
    return snapshot


async def test_site_works_as_the_append_only_user(browser: Browser, new_browser: Any, app: Any, site: aioredis.Redis,
                                                   admin: aioredis.Redis, clock: Any) -> None:
    # CONFIG is refused: the start-up check falls back to INFO, and sees noeviction there.
    assert not [w for w in await check_redis(site) if "maxmemory-policy" in w]
    assert (await browser.register("alice@example.com")).code == 303
    assert (await browser.get("/account")).code == 200
    page = app.ctx.sessions.scripts.touch.function  # the page's function: the ACL lets the site load it
    assert page and await admin.function_list(library=page)
    assert (await browser.logout()).code == 303
    assert (await browser.login("alice@example.com", "wrong password")).code == 401
    assert (await browser.login("alice@example.com")).code == 303
    other = new_browser()
    assert (await other.register("bob@example.com")).code == 303
    clock.advance(app.ctx.settings.session_idle + 1)
    expired, _ = await app.ctx.sessions.expire_due(int(clock() * 1000))
    assert expired == 2  # both idle: the sweeper's script runs as the site user too
    assert (await browser.login("alice@example.com")).code == 303
    await make_admin(admin, "alice@example.com")
    page = await browser.get("/admin/audit?type=login")
    assert page.code == 200 and b"bob@example.com" in page.body
    export = await browser.get("/admin/audit.ndjson?user=bob@example.com")
    assert export.code == 200 and export.body.count(b"\n") == 3  # register, login, expired
    assert [e.type for e in await read_events(admin)] == [
        "register", "login", "logout", "login_failed", "login", "register", "login", "expired", "expired", "login"]


async def test_site_user_may_wait_for_replicas(site: aioredis.Redis) -> None:
    """--redis-wait-replicas sends WAIT after each state change, as the site's user."""
    assert await site.execute_command("WAIT", 0, 10) == 0


async def test_site_user_cannot_delete_trim_or_overwrite_the_audit_trail(browser: Browser, site: aioredis.Redis,
                                                                        admin: aioredis.Redis) -> None:
    await browser.register("alice@example.com")
    before = await _audit_snapshot(admin)
    first = next(iter(before[keys.AUDIT.encode()]))[0]
    uid = (await admin.hget(keys.EMAILS, "alice@example.com")).decode()
    refused = [
        ("XDEL", keys.AUDIT, first), ("XTRIM", keys.AUDIT, "MAXLEN", "0"),
        ("XTRIM", keys.AUDIT, "MINID", "99999999999999"),
        ("DEL", keys.AUDIT), ("UNLINK", keys.AUDIT), ("EXPIRE", keys.AUDIT, "1"), ("PEXPIRE", keys.AUDIT, "1"),
        ("SET", keys.AUDIT, "x"), ("GETDEL", keys.AUDIT), ("RENAME", keys.AUDIT, "sa:x"),
        ("RENAME", keys.SESSION_EVENTS, keys.AUDIT), ("COPY", keys.SESSION_EVENTS, keys.AUDIT, "REPLACE"),
        ("XSETID", keys.AUDIT, "99999999999999-0"), ("XGROUP", "CREATE", keys.AUDIT, "g", "0"),
        ("DEL", keys.AUDIT_TYPE + "login"), ("XTRIM", keys.AUDIT_USER + uid, "MAXLEN", "0"),
        ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"), ("CONFIG", "SET", "appendonly", "no"),
        ("KEYS", "*"), ("SCAN", "0"), ("SWAPDB", "0", "1"), ("ACL", "LIST"), ("SCRIPT", "FLUSH"),
        ("FUNCTION", "FLUSH"), ("BGREWRITEAOF",), ("MONITOR",),
        # The user-agent dictionary: entries can be added (HSETNX), never changed or removed.
        ("HSET", keys.AGENTS + "1", "k", "v"), ("HDEL", keys.AGENTS + "1", "k"), ("DEL", keys.AGENTS + "1"),
    ]
    for command in refused:
        with pytest.raises(NoPermissionError):
            await site.execute_command(*command)
    assert await _audit_snapshot(admin) == before
    # Still allowed: what the site and the live follower read.
    assert await site.xlen(keys.AUDIT) == 2
    assert await site.type(keys.AUDIT) == b"stream"
    assert len(await site.xread({keys.AUDIT: "0"}, count=10)) == 1
    assert (await site.xinfo_stream(keys.AUDIT))["length"] == 2


async def test_scripts_run_as_the_site_user_cannot_trim_or_delete(browser: Browser, site: aioredis.Redis,
                                                                  admin: aioredis.Redis, clock: Any, app: Any) -> None:
    await browser.register("alice@example.com")
    assert await app.ctx.seals.seal_once() == 2  # retention removes sealed events only
    before = await _audit_snapshot(admin)
    timelines = await admin.hgetall("sa:sessev")
    assert timelines
    for body in ("return redis.call('XTRIM', 'audit:log', 'MAXLEN', '0')",
                 "return redis.call('DEL', 'audit:log')",
                 "local e = redis.call('XRANGE', 'audit:log', '-', '+', 'COUNT', 1)\n"
                 "return redis.call('XDEL', 'audit:log', e[1][1])",
                 "return redis.call('EXPIRE', 'audit:t:login', 1)"):
        with pytest.raises(ResponseError, match=r"(?i)NOPERM|can't access|no permissions"):
            await site.eval(body, 0)
    # The retention script itself, as the sweeper would run it with these credentials.
    with pytest.raises(ResponseError, match=r"(?i)NOPERM|can't access|no permissions"):
        await AuditLog(site).trim_step(int(clock() * 1000) + 60_000)
    assert await _audit_snapshot(admin) == before
    assert await admin.hgetall("sa:sessev") == timelines  # refused before it changed anything
    # ...while a script that appends and writes state, like every script of the site, runs.
    assert await site.eval("redis.call('HSET', 'sa:meta:t', 'a', '1')\n"
                           "return redis.call('XADD', 'audit:t:test', '*', 'u', '')", 0)


async def test_detect_mode(site: aioredis.Redis, admin: aioredis.Redis, maint: aioredis.Redis,
                           admin_url: str) -> None:
    await admin.xadd(keys.AUDIT, {"t": "login"})
    assert await detect_mode(site) == APPEND_ONLY
    assert await detect_mode(admin) == FULL
    assert await detect_mode(maint) == FULL
    assert await admin.xlen(keys.AUDIT) == 1  # the probe removed nothing
    # A user that may trim but not run scripts is probed with XTRIM ... MINID 0, which removes nothing.
    await admin.execute_command("ACL", "SETUSER", "noscripts", "on", ">pw", "~*", "+@all", "-eval")
    await admin.execute_command("ACL", "SETUSER", "notrim", "on", ">pw", "~*", "+@all", "-eval", "-xtrim")
    try:
        for user, mode in (("noscripts", FULL), ("notrim", APPEND_ONLY)):
            client = aioredis.Redis.from_url(admin_url.replace("redis://", f"redis://{user}:pw@", 1))
            try:
                assert await detect_mode(client) == mode
            finally:
                await client.aclose()
    finally:
        await admin.execute_command("ACL", "DELUSER", "noscripts", "notrim")
    assert await admin.xlen(keys.AUDIT) == 1


async def test_maintenance_user_trims_and_does_nothing_else(browser: Browser, new_browser: Any, clock: Any,
                                                            maint: aioredis.Redis, maint_url: str,
                                                            admin: aioredis.Redis, app: Any) -> None:
    await browser.register("old@example.com")
    await browser.logout()
    assert await app.ctx.seals.seal_once() == 3  # sealed as the site user
    clock.advance(3600)
    cutoff = int(clock() * 1000) - 1  # before the new account's events (TRIM's bound includes its own ms)
    await new_browser().register("new@example.com")
    assert await app.ctx.seals.seal_once() == 2
    old_uid = (await admin.hget(keys.EMAILS, "old@example.com")).decode()
    new_uid = (await admin.hget(keys.EMAILS, "new@example.com")).decode()
    assert await admin.hlen(keys.SESSION_EVENTS) == 2

    assert await AuditLog(maint).trim_step(cutoff) == 3  # register, login, logout of the old account
    assert [e.type for e in await read_events(admin)] == ["register", "login"]
    # The seal of the batch it removed stays, as the marker of where the kept trail begins: it verifies.
    assert await admin.xlen(keys.SEALS) == 2
    report = await verify_redis(admin, app.ctx.seals.keys, now_ms=int(clock() * 1000), retention_days=0)
    assert report.ok and report.removed == 3 and report.events == 2
    assert not await admin.exists(keys.AUDIT_USER + old_uid)  # emptied, so removed
    assert await admin.xlen(keys.AUDIT_USER + new_uid) == 2
    assert await admin.xlen(keys.AUDIT_TYPE + "logout") == 0
    assert await admin.hlen(keys.SESSION_EVENTS) == 1
    assert await AuditLog(maint).trim_step(cutoff) == 0

    # `server.py audit trim --redis-url=<maintenance user>`: the test clock is years behind the wall clock.
    assert await audit_command(maint_url, "trim", test_settings(audit_retention_days=1)) == 0
    assert await admin.xlen(keys.AUDIT) == 0

    for command in (("XADD", keys.AUDIT, "*", "t", "forged"), ("DEL", keys.AUDIT_TYPE + "login"), ("DEL", keys.AUDIT),
                    ("XADD", keys.SEALS, "*", "k", "c1"), ("DEL", keys.SEALS), ("GET", keys.SEAL_LEASE),
                    ("XDEL", keys.AUDIT, "1-0"), ("HGET", keys.USER + new_uid, "hash"),
                    ("HDEL", keys.USER + new_uid, "hash"), ("DEL", keys.SESSION_EVENTS), ("FLUSHALL",),
                    ("KEYS", "*"), ("CONFIG", "GET", "maxmemory")):
        with pytest.raises(NoPermissionError):
            await maint.execute_command(*command)
    assert await admin.hget(keys.USER + new_uid, "email") == b"new@example.com"


async def test_the_site_user_seals_but_cannot_remove_or_rewrite_seals(browser: Browser, site: aioredis.Redis,
                                                                      admin: aioredis.Redis, app: Any,
                                                                      clock: Any) -> None:
    await browser.register("alice@example.com")
    assert await app.ctx.seals.seal_once() == 2  # the lease under sa:, the seal appended to audit:seal
    await app.ctx.seals.follow_once()
    seals = await admin.xrange(keys.SEALS)
    assert len(seals) == 1
    newest = seals[0][0].decode()
    for command in (("XDEL", keys.SEALS, newest), ("XTRIM", keys.SEALS, "MAXLEN", "0"), ("DEL", keys.SEALS),
                    ("RENAME", keys.SEALS, "sa:x"), ("COPY", keys.SEALS, "sa:x"), ("EXPIRE", keys.SEALS, "1"),
                    ("SET", keys.SEALS, "x")):
        with pytest.raises(NoPermissionError):
            await site.execute_command(*command)
    with pytest.raises(ResponseError, match=r"(?i)NOPERM|can't access|no permissions"):
        await site.eval("return redis.call('XDEL', 'audit:seal', ARGV[1])", 0, newest)
    assert await admin.xrange(keys.SEALS) == seals
    report = await verify_redis(site, app.ctx.seals.keys, now_ms=int(clock() * 1000), retention_days=365)
    assert report.ok and report.events == 2 and app.ctx.seals.status.verified_id == newest


async def test_maintenance_user_drops_the_dictionaries_of_trimmed_days(browser: Browser, new_browser: Any,
                                                                       clock: Any, maint: aioredis.Redis,
                                                                       admin: aioredis.Redis, app: Any) -> None:
    await browser.register("old@example.com")
    await app.ctx.seals.seal_once()  # retention removes sealed batches
    clock.advance(2 * 86_400)
    await new_browser().register("new@example.com")
    await app.ctx.seals.seal_once()
    assert len(await admin.keys(keys.AGENTS + "*")) == 2
    while await AuditLog(maint).trim_step(int(clock() * 1000) - 86_400_000):
        pass
    [left] = await admin.keys(keys.AGENTS + "*")
    assert left.decode() == keys.agents_key(f"{int(clock() * 1000)}-0")
    assert {e.user for e in await read_events(admin)} == {"new@example.com"}


async def test_a_maintenance_user_of_the_earlier_acl_file_still_trims_whole(browser: Browser, clock: Any,
                                                                            maint: aioredis.Redis,
                                                                            admin: aioredis.Redis, app: Any) -> None:
    """The ACL file of the previous version let the maintenance user delete no index stream: the trim
    that now removes an emptied user index must not stop half done on a Redis still running it (the
    trail trimmed, a refused DEL, the rest left for ever); it keeps the empty index, as before."""
    line = next(x for x in ACL_FILE.read_text().splitlines() if x.startswith(f"user {MAINT_USER} "))
    earlier = line.replace("(~audit:ua* ~audit:u:* +del)", "(~audit:ua* +del)")
    assert earlier != line
    rules = re.findall(r"\([^)]*\)|\S+", earlier)[2:]  # after "user <name>"
    rules = ["#" + hashlib.sha256(PASSWORDS["MAINT"].encode()).hexdigest() if r == "#MAINT_PASSWORD_SHA256" else r
             for r in rules]
    await admin.execute_command("ACL", "SETUSER", MAINT_USER, "reset", *rules)
    try:
        await browser.register("old@example.com")
        await browser.logout()
        assert await app.ctx.seals.seal_once() == 3
        clock.advance(86_400)
        uid = (await admin.hget(keys.EMAILS, "old@example.com")).decode()
        assert await AuditLog(maint).trim_step(int(clock() * 1000)) == 3
        assert await admin.xlen(keys.AUDIT) == 0
        assert [await admin.xlen(keys.AUDIT_TYPE + t) for t in ("register", "login", "logout")] == [0, 0, 0]
        assert await admin.hlen(keys.SESSION_EVENTS) == 0 and not await admin.keys(keys.AGENTS + "*")
        assert await admin.exists(keys.AUDIT_USER + uid) and await admin.xlen(keys.AUDIT_USER + uid) == 0
    finally:
        await admin.execute_command("ACL", "LOAD")  # the module's users, from the file of this version
