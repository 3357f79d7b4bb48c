"""The command line: serve (default), create-user, reset-password, audit verify|trim.

The only module that touches argv, the environment, stdin, signals and the process's logging.
Precedence of option values, lowest first: default, ``--config`` file, environment, command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import io
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from . import acl, config, keys, redisconn
from .config import Settings
from .redis_server import RedisServer, RedisServerError
from .redisconn import redis_client  # noqa: F401 (moved to redisconn; tests and other callers import it here)
from .redisconn import safe_url as _safe_url  # noqa: F401 (likewise)

log = logging.getLogger("sessionaudit")

COMMANDS = ("serve", "create-user", "reset-password", "audit")
SHUTDOWN_GRACE = 10.0  # seconds to let requests in flight finish


class UsageError(Exception):
    """A bad option or value: printed without a traceback, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="Accounts with Redis sessions and an audited session trail.",
        epilog="Every option also reads the environment variable named in brackets; the command line wins "
               "over the environment, the environment over --config. COOKIE_SECRET is read from the "
               "environment only (else generated into --data-dir); every other key is derived from it, "
               "unless SESSION_SECRET (environment only) is set. The commands work beside a server running "
               "on the embedded Redis with the same --data-dir.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="serve", choices=COMMANDS,
                        help="serve (default), create-user, reset-password, or audit")
    parser.add_argument("action", nargs="?", choices=("verify", "trim"), help="for audit: verify or trim")
    for f in config.cli_fields():
        flag = "--" + f.name.replace("_", "-")
        given = "(default" in f.metadata["help"]  # a default worked out at start, said in the help itself
        help_text = f"{f.metadata['help']}{'' if given else f' (default: {f.default!r})'} [{config.env_name(f.name)}]"
        if f.metadata.get("flag"):
            parser.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    parser.add_argument("--email", help="for create-user and reset-password: the account's email")
    parser.add_argument("--admin", action="store_true", help="for create-user: make the account an admin")
    parser.add_argument("--file", metavar="EXPORT.ndjson",
                        help="for audit verify: check an export made with seals (/admin/audit.ndjson?seals=1) "
                             "offline, with the key, instead of the trail in Redis")
    return parser


def resolve_settings(ns: argparse.Namespace, environ: dict[str, str]) -> Settings:
    """Defaults < config file < environment < command line; raise UsageError on a bad value."""
    fields = {f.name: f for f in config.cli_fields()}
    config_file = ns.config or environ.get("CONFIG", "")
    values: dict[str, Any] = {}
    try:
        if config_file:  # its errors name the file, the line and the option as written there
            values.update(config.read_config_file(config_file))
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        for name, f in fields.items():
            env = environ.get(config.env_name(name))
            if env is not None and env != "":
                values[name] = config.convert(f, env, config.env_name(name))
            given = getattr(ns, name, None)
            if given is not None:
                values[name] = config.convert(f, given, "--" + name.replace("_", "-"))
        settings = Settings(**values)
        settings.validate()
    except (ValueError, TypeError) as e:
        # Name options as on the command line (--session-idle; its help names SESSION_IDLE), not as
        # fields; what the user typed (quoted in the message) stays as it was.
        parts = re.split(r"""('[^']*'|"[^"]*")""", str(e))
        message = "".join(part if i % 2 else re.sub(
            r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b", lambda m: "--" + m[0].replace("_", "-") if m[0] in fields else m[0], part)
            for i, part in enumerate(parts))
        raise UsageError(message) from None
    return settings


# -- logging --------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the access fields when present."""

    EXTRA = ("request_id", "method", "route", "path", "status", "duration_ms", "user", "seal", "seal_problem")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in self.EXTRA:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class LogHandler(logging.StreamHandler):
    """Writes each record at once but flushes the stream only for warnings and on ``flush_now``.

    An access line per request would otherwise cost a write system call per request; ``serve``
    flushes twice a second and at shutdown, so a line is out within half a second.
    """

    def flush(self) -> None:
        pass  # StreamHandler.emit calls this after every record

    def flush_now(self) -> None:
        super().flush()

    def close(self) -> None:  # logging.shutdown at exit: nothing is left in the buffer
        self.flush_now()
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()


def _log_stream_write() -> Any:
    """The ``write`` of the stream the log handler writes to (for access lines), if logging is set up."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogHandler):
            return handler.stream.write
    return None


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogHandler):
            handler.flush_now()


def setup_logging(settings: Settings) -> None:
    # What our formats never show, logging need not work out for every record (the logging
    # HOWTO's "Optimization"): the calling frame, thread, process and task names.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]
    # stderr is line-buffered (a write system call per line, so per request): the log gets a stream
    # of its own on the same file, block-buffered, which LogHandler flushes as its docstring says.
    try:
        stream: Any = io.TextIOWrapper(open(sys.stderr.fileno(), "wb", buffering=1 << 16, closefd=False),
                                       encoding="utf-8", errors="backslashreplace")
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded, captured)
        stream = sys.stderr
    handler = LogHandler(stream)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Tornado's own access log duplicates ours (and would print query strings): keep its warnings only.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


# -- Redis ----------------------------------------------------------------------------

def start_embedded(settings: Settings, *, join: bool = False) -> tuple[str, RedisServer | None]:
    """The Redis to use: ``--redis-url``, else the embedded server (started here, or with ``join``
    the one of a site already running on this data dir)."""
    if settings.redis_url or settings.redis_sentinel:
        return settings.redis_url, None
    server = RedisServer.embedded(settings.data_dir)
    try:
        server.start(join=join)
    except RedisServerError as e:
        raise UsageError(f"cannot start the embedded Redis: {e}") from None
    return server.url, server


async def check_redis(client: aioredis.Redis, wait_replicas: int = 0) -> list[str]:
    """Warnings about a Redis that would lose sessions or audit entries, or refuse state changes."""
    warnings: list[str] = []
    if wait_replicas:
        replicas = int((await client.info("replication")).get("connected_slaves", 0))
        if replicas < wait_replicas:
            warnings.append(f"Redis has {replicas} replica(s) connected and redis_wait_replicas is "
                            f"{wait_replicas}: logins, logouts and every other state change answer 503 "
                            "until enough replicas are connected.")
    try:
        policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
        aof = (await client.config_get("appendonly")).get("appendonly")
        save = (await client.config_get("save")).get("save")
    except redis.exceptions.ResponseError:  # CONFIG not allowed for this user: INFO tells less
        info = await client.info("persistence")
        policy = (await client.info("memory")).get("maxmemory_policy")
        aof = "yes" if info.get("aof_enabled") else "no"
        save = ""  # snapshot rules are not visible without CONFIG: judge by the AOF alone
    if policy and policy != "noeviction":
        warnings.append(f"Redis maxmemory-policy is {policy!r}, not 'noeviction': when memory runs out Redis "
                        "will silently drop sessions and audit entries. Set maxmemory-policy noeviction.")
    if aof != "yes" and not save:
        warnings.append("Redis persistence is off (no AOF, and no RDB snapshots that this user can see): a "
                        "Redis restart loses every account, session and audit entry. Set appendonly yes.")
    return warnings


async def mark_legacy_agents(client: aioredis.Redis) -> None:
    """Note when events stopped naming the user-agent dictionary of earlier versions (``audit:ua``),
    so that retention drops it once no kept event is older (keys.LEGACY_AGENTS_UNTIL)."""
    if await client.exists(keys.LEGACY_AGENTS):
        await client.set(keys.LEGACY_AGENTS_UNTIL, int(time.time() * 1000), nx=True)


# -- serve ----------------------------------------------------------------------------

async def serve(settings: Settings, url: str) -> None:
    import tornado.httpserver
    import tornado.ioloop

    from .app import make_app
    from .factors import DataKeyLost
    from .sweeper import Sweeper

    client = redisconn.connect(settings, url)
    where = redisconn.describe(settings, url)
    mode = acl.FULL
    try:
        for warning in await check_redis(client, settings.redis_wait_replicas):
            log.warning(warning)
        mode = await acl.detect_mode(client)
        await mark_legacy_agents(client)
    except redisconn.UNAVAILABLE as e:
        log.warning("Redis (%s) is not answering yet (%s); pages answer 503 until it does", where, e)
    if settings.session_secret_source:
        log.info("sessions are named with the secret from %s; every process on this Redis must use the same "
                 "(unset it everywhere to derive it from COOKIE_SECRET: that logs everyone out once)",
                 settings.session_secret_source)
    if mode == acl.APPEND_ONLY:
        log.info("audit trail: append-only Redis user; this process does not trim it "
                 "(run `server.py audit trim` as the maintenance user from a timer)")
    else:
        log.info("audit trail: this Redis user may trim it; the sweeper applies the %d-day retention",
                 settings.audit_retention_days)
    app = make_app(settings, client)
    app.ctx.access.configure(_log_stream_write(), json=settings.log_format == "json")
    with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        if converted := await app.ctx.sessions.migrate():
            log.info("converted %d live session(s) kept the way earlier versions kept them", converted)
    app.ctx.append_only = mode == acl.APPEND_ONLY
    ctx = app.ctx
    try:  # re-sealed under the newest COOKIE_SECRET now, so that an older version can be dropped later
        await ctx.factors.data_key()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        pass  # loaded at first use
    except DataKeyLost as e:
        log.error("%s", e)
    log_mail_setup(settings, ctx.mailer)
    with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        if not await ctx.users.any_admin():
            log.warning("no admin account yet: create one beside this server with `%s create-user "
                        "--email=you@example.com --admin%s`", _this_command(), _same_redis(settings))
    server = tornado.httpserver.HTTPServer(app, xheaders=settings.xheaders, max_body_size=1024 * 1024,
                                          idle_connection_timeout=60, body_timeout=30)
    try:
        server.listen(settings.port, settings.address)
    except OSError as e:
        raise UsageError(f"cannot listen on {settings.address}:{settings.port}: {e.strerror}") from None
    sweeper = Sweeper(ctx.sessions, ctx.audit, ctx.clock, throttle=ctx.throttle, interval=settings.sweep_interval,
                      retention_days=settings.audit_retention_days, trim=not ctx.append_only,
                      on_run=ctx.metrics.sweep, on_reconnect=ctx.metrics.redis_reconnects.inc)
    sweeper.start()
    watch = redisconn.PrimaryWatch(client)  # with Sentinel: connections follow a planned failover at once
    watch.start()
    from .seal import OutsideCopy, outside_path
    ctx.seals.outside = OutsideCopy(outside_path(settings))
    if not ctx.seals.keys.current:
        log.warning("audit seals: no key (COOKIE_SECRET or AUDIT_KEY): events are not sealed")
    ctx.seals.start()
    metrics_server = None
    if settings.metrics_port:
        from .handlers.metrics import start_metrics_server
        metrics_server = start_metrics_server(ctx, settings.metrics_address, settings.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving on http://%s:%d/ (Redis: %s)", settings.address, settings.port, where)
    flush_logs()
    flusher = tornado.ioloop.PeriodicCallback(flush_logs, 500)
    flusher.start()
    await stop.wait()
    log.info("shutting down: no new connections, finishing %d request(s) in flight", ctx.in_flight)
    server.stop()
    if metrics_server:
        metrics_server.stop()
    await ctx.close_followers()  # live-follow streams end, so their requests finish
    try:
        await asyncio.wait_for(ctx.drained(), SHUTDOWN_GRACE)
    except TimeoutError:
        log.warning("%d request(s) still in flight after %.0f s", ctx.in_flight, SHUTDOWN_GRACE)
    try:
        await asyncio.wait_for(server.close_all_connections(), 2)
    except TimeoutError:
        log.warning("closing connections that did not finish in time")
    await sweeper.stop()
    await ctx.seals.stop()
    await ctx.mailer.stop()  # what the mail server has not taken yet is kept in the outbox
    await watch.stop()
    ctx.close()
    await client.aclose()
    flusher.stop()
    log.info("stopped")
    flush_logs()


def log_mail_setup(settings: Settings, mailer: Any) -> None:
    """Say at start where mail goes, and where its links point."""
    target = mailer.target
    if target is None:
        log.info("mail: no --smtp-url, so each message is written to %s/ (links to %s)", mailer.outbox.resolve(),
                 settings.origin)
        return
    log.info("mail: %s, from %s (links to %s)", target.safe_url, settings.sender, settings.origin)
    if target.password and not (target.use_tls or target.start_tls) and target.host not in ("localhost", "127.0.0.1",
                                                                                         "::1"):
        log.warning("mail: the SMTP password would cross the network in clear; use smtps:// or ?starttls=1")
    if not settings.public_url:
        log.warning("mail: no --public-url: links in mail point to %s, which may not be how people reach the site",
                    settings.origin)


def _this_command() -> str:
    """How this server was started (``.venv/bin/python server.py``), to show a command to run beside it."""
    python = os.path.relpath(sys.executable)
    if python.startswith(".."):
        python = sys.executable
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("server.py") else "server.py"
    return f"{python} {script}"


def _same_redis(settings: Settings) -> str:
    """The options a command needs to reach this server's Redis (never the URL itself: it may hold a password)."""
    if settings.redis_url:
        return " and the same --redis-url"
    return "" if settings.data_dir == "var" else f" --data-dir={settings.data_dir}"


# -- create-user ------------------------------------------------------------------------

def read_password(stdin: Any) -> str:
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Password again: ")
        if first != second:
            raise UsageError("the two passwords do not match")
        return first
    line = stdin.readline()
    return line.rstrip("\r\n")


async def create_user(settings: Settings, url: str, email_raw: str, admin: bool, password: str) -> str:
    from .passwords import Passwords
    from .users import InvalidEmail, UserStore, normalize_email

    try:
        email = normalize_email(email_raw)
    except InvalidEmail as e:
        raise UsageError(f"invalid email: {e}") from None
    client = redisconn.connect(settings, url)
    passwords = Passwords(settings)
    try:
        users = UserStore(client, time.time)
        if await users.get_by_email(email):
            raise UsageError(f"an account with {email} already exists")
        problem, password_hash = await passwords.check_and_hash(password, email)
        if problem or not password_hash:
            raise UsageError(f"weak password: {problem}")
        uid = await users.create(email, password_hash, admin=admin, ip="", user_agent="server.py create-user")
        if uid is None:
            raise UsageError(f"an account with {email} already exists")
        return uid
    finally:
        passwords.close()
        await client.aclose()


# -- reset-password -----------------------------------------------------------------------

async def reset_password(settings: Settings, url: str, email_raw: str) -> str:
    """A one-time reset link for an account, for sites without mail; recorded like any reset request."""
    from .resets import ResetStore
    from .users import InvalidEmail, UserStore, normalize_email

    try:
        email = normalize_email(email_raw)
    except InvalidEmail as e:
        raise UsageError(f"invalid email: {e}") from None
    client = redisconn.connect(settings, url)
    try:
        user = await UserStore(client, time.time).get_by_email(email)
        if user is None:
            raise UsageError(f"no account with {email}")
        if user.disabled:
            raise UsageError(f"the account {email} is disabled: enable it first (on its admin page)")
        resets = ResetStore(client, settings, time.time)
        asked = await resets.request(email, ip="", user_agent="server.py reset-password", throttled=False)
        if asked.token is None:  # disabled or removed in between
            raise UsageError(f"no enabled account with {email}")
        return resets.link(asked.token)
    finally:
        await client.aclose()


# -- audit ----------------------------------------------------------------------------

async def audit_command(url: str, action: str, settings: Settings) -> int:
    from .audit import AuditLog

    client = redisconn.connect(settings, url)
    try:
        audit = AuditLog(client)
        if action == "verify":
            return await verify_command(client, settings)
        if settings.audit_retention_days <= 0:
            say(settings, "audit_retention_days is 0: nothing to trim", trimmed=0)
            return 0
        cutoff = int(time.time() * 1000) - settings.audit_retention_days * 86_400_000
        total = 0
        while True:
            removed = await audit.trim_step(cutoff)
            total += removed
            if removed == 0:
                break
            await asyncio.sleep(0.01)  # let other clients in between steps
        say(settings, f"trimmed {total} event(s) older than {settings.audit_retention_days} days (whole sealed "
                      "batches; events not sealed yet stay)", trimmed=total)
        return 0
    finally:
        await client.aclose()


async def verify_command(client: aioredis.Redis, settings: Settings) -> int:
    """``audit verify``: the seals (against the copy outside Redis in --data-dir) and the session stories,
    in one pass over the trail. Exit 1 naming the first problem; 0 and a summary when intact."""
    from . import seal
    from .audit import StoryCheck

    keys_ = seal.SealKeys.from_settings(settings)
    copy = seal.OutsideCopy(seal.outside_path(settings))
    notes: list[str] = []
    try:
        outside = copy.read()
    except ValueError as e:
        outside = None
        notes.append(f"{e}: the newest events cannot be checked against it")
    if outside is None:
        notes.append(f"no copy of the newest seal outside Redis at {copy.path} (the site writes it into its "
                     "--data-dir): whether the newest events were cut off cannot be told here")
    if not keys_ and (await client.exists(keys.SEALS) or outside is not None):
        raise UsageError("audit verify needs the seal key: set COOKIE_SECRET (or AUDIT_KEY) as the site has it, "
                         "or give the site's --data-dir")
    stories = StoryCheck()
    report = await seal.verify_redis(client, keys_, now_ms=int(time.time() * 1000),
                                     retention_days=settings.audit_retention_days, outside=outside,
                                     on_entries=stories.feed)
    report.notes[:0] = notes
    summary = await stories.finish(client)
    ok = report.ok and not summary.problems
    if settings.log_format == "json":
        print(json.dumps({"events": summary.events, "by_type": dict(summary.by_type),
                          "sessions": summary.sessions, "open_sessions": summary.open_sessions,
                          "live_sessions": summary.live_sessions,
                          "problems": [p.message for p in report.problems] + summary.problems,
                          "ok": ok, "seals": report.to_json()}))
        return 0 if ok else 1
    print_seal_report(report, "the trail in Redis")
    print(f"events: {summary.events}")
    for kind, count in sorted(summary.by_type.items()):
        print(f"  {kind}: {count}")
    print(f"sessions: {summary.sessions} logged in, {summary.open_sessions} not ended, "
          f"{summary.live_sessions} live in Redis")
    if summary.problems:
        print(f"{len(summary.problems)} problem(s) with the session stories:")
        for problem in summary.problems[:100]:
            print(f"  {problem}")
    if not ok:
        first = report.problems[0].message if report.problems else summary.problems[0]
        print(f"FAILED: {first}")
        return 1
    print("ok: every event is what was sealed; every session has one login and at most one end, after it; "
          "live sessions match")
    return 0


def print_seal_report(report: Any, what: str) -> None:
    from .events import id_ms, iso_ms

    def at(ident: str) -> str:
        return iso_ms(id_ms(ident))

    print(f"seals: {what}: {report.events} event(s) checked against {report.seals} seal(s)")
    if report.marker is not None:
        print(f"  the kept trail begins after event {report.marker.id} ({at(report.marker.id)}); retention "
              f"removed {report.removed} event(s) before it")
    if report.verified is not None and report.verified.total:
        print(f"  sealed and verified through event {report.verified.id} ({at(report.verified.id)}), "
              f"{report.verified.total} event(s) since the chain began")
    if report.newest is not None:
        print(f"  newest seal: {report.newest.id}, chain {report.newest.mac.hex()}")
    if report.outside is not None:
        state = "does not match" if any(p.kind == "cut_off" for p in report.problems) else "matches"
        print(f"  copy outside Redis ({report.outside.path}): seal {report.outside.id}, {report.outside.total} "
              f"event(s): {state}")
    if report.unsealed:
        print(f"  {report.unsealed} newer event(s), from {report.unsealed_from}, are not sealed yet (a running site "
              "seals each within 2 s)")
    for note in report.notes:
        print(f"  note: {note}")
    if report.problems:
        print(f"  {len(report.problems) + report.more_problems} problem(s):")
        for problem in report.problems:
            print(f"    {problem.message}")


def verify_file_command(path: str, settings: Settings) -> int:
    """``audit verify --file EXPORT.ndjson``: an export with seals, checked offline with the key."""
    from . import seal

    keys_ = seal.SealKeys.from_settings(settings)
    if not keys_:
        raise UsageError("audit verify needs the seal key: set COOKIE_SECRET (or AUDIT_KEY) as the site has it, "
                         "or give the site's --data-dir")
    try:
        report = seal.verify_export(seal.read_lines(path), keys_, path)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if settings.log_format == "json":
        print(json.dumps({"file": path, **report.to_json()}))
        return 0 if report.ok else 1
    print_seal_report(report, path)
    if not report.ok:
        print(f"FAILED: {report.problems[0].message}")
        return 1
    print("ok: every event in the file is what was sealed")
    return 0


# -- main -----------------------------------------------------------------------------

def say(settings: Settings, text: str, **fields: Any) -> None:
    """A command's result on stdout: a line of text, or one JSON object with --log-format=json."""
    print(json.dumps({"message": text, **fields}) if settings.log_format == "json" else text)


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        settings = resolve_settings(ns, environ)
        setup_logging(settings)
        if ns.command == "audit" and not ns.action:
            raise UsageError("audit needs an action: verify or trim")
        if ns.command in ("create-user", "reset-password") and not ns.email:
            raise UsageError(f"{ns.command} needs --email")
        try:
            if ns.command == "serve":
                settings = config.load_secrets(settings)
            elif ns.command == "audit" and ns.action == "verify":
                settings = config.load_secrets(settings, create=False)  # the site's key; never a new one
        except ValueError as e:  # a malformed COOKIE_SECRET or AUDIT_KEY
            raise UsageError(str(e)) from None
        if ns.file and (ns.command, ns.action) != ("audit", "verify"):
            raise UsageError("--file goes with audit verify")
        try:
            return _run(ns, settings)
        finally:
            flush_logs()
    except UsageError as e:
        # The settings may be what failed: the format comes from the flag or the environment.
        if (ns.log_format or environ.get("LOG_FORMAT")) == "json":
            print(json.dumps({"level": "error", "message": str(e)}), file=sys.stderr)
        else:
            print(f"server.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _run(ns: argparse.Namespace, settings: Settings) -> int:
    if ns.file:
        return verify_file_command(ns.file, settings)  # offline: no Redis
    # Asked before Redis starts, so a prompt never holds the data dir while someone types.
    password = read_password(sys.stdin) if ns.command == "create-user" else ""
    # Commands use the Redis of a site running on this data dir; a second site is refused.
    url, embedded = start_embedded(settings, join=ns.command != "serve")
    try:
        if ns.command == "serve":
            _event_loop_policy()
            asyncio.run(serve(settings, url))
            return 0
        if ns.command == "create-user":
            uid = asyncio.run(create_user(settings, url, ns.email, ns.admin, password))
            say(settings, f"created user {uid} ({'admin' if ns.admin else 'not admin'})", created_user=uid,
                admin=ns.admin)
            return 0
        if ns.command == "reset-password":
            link = asyncio.run(reset_password(settings, url, ns.email))
            if settings.log_format == "json":
                say(settings, "a one-time reset link (30 minutes)", link=link)
            else:
                print(link)
                print("One-time link, valid for 30 minutes; asking again replaces it.", file=sys.stderr)
            return 0
        return asyncio.run(audit_command(url, ns.action, settings))
    except redisconn.NotReplicated as e:
        raise UsageError(f"Redis did not confirm the change on {settings.redis_wait_replicas} replica(s) in time "
                         f"({e}): it may or may not have been made; check before trying again") from None
    except redisconn.UNAVAILABLE as e:
        raise UsageError(f"cannot reach Redis ({redisconn.describe(settings, url)}): {e}") from None
    finally:
        if embedded:
            embedded.stop()


def _event_loop_policy() -> None:
    """uvloop when installed: a faster event loop under the same asyncio API.

    Also: a thread that wants the GIL (the IOLoop, when a hashing thread holds it between two
    hashes) waits at most a millisecond for it, not Python's default five: under a storm of logins
    that wait showed in the pages' p99.
    """
    sys.setswitchinterval(0.001)
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

