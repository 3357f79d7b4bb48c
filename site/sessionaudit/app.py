"""make_app(settings, redis, clock): the Tornado application, its route table and its stores."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import jinja2
import redis.asyncio as aioredis
import tornado
import tornado.httputil
import tornado.web

from . import events, redisconn, views
from .accesslog import AccessLog
from .audit import AuditLog
from .config import Settings
from .factors import FactorStore
from .handlers import account, admin, auth, public, reset, security
from .live import LiveHub
from .mail import Mailer
from .metrics import Metrics, method_label
from .passkeys import PasskeyStore
from .passwords import Passwords
from .ratelog import RateLimitedLog
from .resets import ResetStore
from .seal import SealKeys, SealService
from .sessions import SessionStore
from .stats import Stats
from .throttle import Throttle
from .users import UserStore

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")


class Context:
    """What every handler shares: settings, Redis, the clock, the stores. Built once per app."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, clock: Callable[[], float]):
        self.settings = settings
        self.redis = redis
        self.clock = clock
        self.metrics = Metrics()
        self.access = AccessLog()  # serve points it at the log stream
        # Warnings an anonymous flood could repeat (forged forms, throttled logins): once per 10 s per kind.
        self.security = RateLimitedLog(logging.getLogger("sessionaudit.security"))
        count = self.metrics.event
        # State changes answer once --redis-wait-replicas replicas hold them (scripts marked acked).
        redisconn.set_wait(redis, settings.redis_wait_replicas, settings.redis_wait_timeout)
        self.users = UserStore(redis, clock, count)
        self.sessions = SessionStore(redis, settings.session_keys(), clock, idle=settings.session_idle,
                                     lifetime=settings.session_lifetime, slack=settings.session_ttl_slack, count=count,
                                     binding=settings.session_binding)
        self.throttle = Throttle(redis, settings, clock, count)
        self.factors = FactorStore(redis, settings, clock, self.sessions, count)
        self.passkeys = PasskeyStore(redis, settings, clock, self.sessions, count)
        self.audit = AuditLog(redis)
        self.stats = Stats(redis, clock)
        self.live = LiveHub(redis, max_followers=settings.max_followers, on_change=self.metrics.followers.set,
                            allowed=self.sessions.live_admins, recheck=settings.live_recheck)
        self.passwords = Passwords(settings, on_hash=self.metrics.hash_seconds.observe)
        self.resets = ResetStore(redis, settings, clock, count)
        self.mailer = Mailer(settings, count=self.metrics.mail_result, pending=self.metrics.mail_queue.set)
        # Seals the trail (while this process holds the lease) and verifies it; started by `serve`, which
        # also gives it the copy outside Redis. Background passes slow down while requests are served.
        self.seals = SealService(redis, SealKeys.from_settings(settings), clock,
                                 retention_days=settings.audit_retention_days, metrics=self.metrics,
                                 busy=lambda: self.in_flight > len(self.live.followers))
        self.jinja = jinja2.Environment(
            loader=jinja2.FileSystemLoader(settings.template_path),
            autoescape=True,
            auto_reload=settings.debug,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined if settings.debug else jinja2.Undefined,
        )
        self.jinja.filters.update(views.FILTERS)
        self.jinja.filters["static"] = self.static_url
        self.jinja.globals.update(ago=views.ago, labels=events.LABELS, session_rows=views.session_rows)
        # The signed cookie has its own expiry check; the session's lifetime is the real limit.
        self.cookie_max_age_days = max(1, settings.session_lifetime // 86400 + 1)
        self.in_flight = 0
        self.static_urls: dict[str, str] = {}  # versioned URLs of static files, filled on first use
        self.pages: dict[str, bytes] = {}  # pages that are the same for every anonymous visitor
        # Session cookies whose signature has been checked: value -> (session id, key version, timestamp).
        self.verified_cookies: dict[str, tuple[str, int | None, int]] = {}
        self.xsrf_tokens: dict[str, tuple[bytes, str]] = {}  # _xsrf cookie value -> (token, timestamp)
        self._idle: asyncio.Event | None = None
        self.append_only = False

    def static_url(self, path: str) -> str:
        """A static file's versioned URL (``{{ 'site.css'|static }}``), worked out once per process."""
        url = self.static_urls.get(path)
        if url is None:
            settings = {"static_path": self.settings.static_path, "static_url_prefix": "/static/"}
            url = self.static_urls[path] = tornado.web.StaticFileHandler.make_static_url(settings, path)
        return url

    def request_done(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no request is in flight (shutdown; the caller bounds the wait)."""
        if self.in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()

    async def close_followers(self) -> None:
        """End every live-follow stream and stop the stream reader (shutdown)."""
        await self.live.close()

    def close(self) -> None:
        self.passwords.close()


class Application(tornado.web.Application):
    ctx: Context
    csp: str
    security_headers: tuple[tuple[str, str], ...]
    _headers_second = -1
    _headers: dict[str, str]

    def response_headers(self) -> dict[str, str]:
        """The headers every response starts with (Tornado's, then ours), the date made once a second."""
        now = int(time.time())
        if now != self._headers_second:
            self._headers = {"Server": f"TornadoServer/{tornado.version}", "Content-Type": "text/html; charset=UTF-8",
                             "Date": tornado.httputil.format_timestamp(now), **dict(self.security_headers)}
            self._headers_second = now
        return self._headers


def make_app(settings: Settings, redis: aioredis.Redis, clock: Callable[[], float] = time.time) -> Application:
    """A fresh application on ``redis``; tests pass their own settings and clock."""
    if not settings.cookie_secret:
        raise ValueError("settings need cookie_secret (config.load_secrets)")
    ctx = Context(settings, redis, clock)
    views.warm_up()
    ref = r"([A-Za-z0-9_-]{16})"
    passkey = r"([A-Za-z0-9_-]{22})"
    routes: list[Any] = [
        (r"/", public.HomeHandler),
        (r"/healthz", public.HealthHandler),
        (r"/register", auth.RegisterHandler),
        (r"/login", auth.LoginHandler),
        (r"/logout", auth.LogoutHandler),
        (r"/login/verify", security.LoginVerifyHandler),
        (r"/login/passkey", security.PasskeyLoginHandler),
        (r"/login/passkey/options", security.PasskeyLoginOptionsHandler),
        (r"/account", account.AccountHandler),
        (r"/account/password", account.PasswordHandler),
        (r"/account/sessions/revoke-others", account.RevokeOthersHandler),
        (rf"/account/sessions/{ref}/revoke", account.RevokeOwnHandler),
        (r"/account/security", security.SecurityHandler),
        (r"/account/security/totp", security.TotpSetupHandler),
        (r"/account/security/totp/confirm", security.TotpConfirmHandler),
        (r"/account/security/totp/disable", security.TotpDisableHandler),
        (r"/account/security/passkeys", security.PasskeyAddHandler),
        (r"/account/security/passkeys/options", security.PasskeyOptionsHandler),
        (rf"/account/security/passkeys/{passkey}/rename", security.PasskeyRenameHandler),
        (rf"/account/security/passkeys/{passkey}/remove", security.PasskeyRemoveHandler),
        (r"/admin/?", admin.DashboardHandler),
        (r"/admin/audit", admin.AuditHandler),
        (r"/admin/audit\.ndjson", admin.AuditExportHandler, {"fmt": "ndjson"}),
        (r"/admin/audit\.csv", admin.AuditExportHandler, {"fmt": "csv"}),
        (r"/admin/audit/live", admin.AuditLiveHandler),
        (r"/admin/sessions", admin.SessionsHandler),
        (rf"/admin/sessions/{ref}", admin.SessionTimelineHandler),
        (rf"/admin/sessions/{ref}/revoke", admin.AdminRevokeHandler),
        (r"/admin/users/([0-9]+)", admin.UserTimelineHandler),
        (r"/admin/users/([0-9]+)/revoke", admin.AdminRevokeAllHandler),
        (r"/admin/users/([0-9]+)/mfa/reset", admin.MfaResetHandler),
        (r"/admin/users/([0-9]+)/(admin|disable|enable|unadmin)", admin.UserFlagHandler),
        (r"/admin/users/([0-9]+)/reset", admin.AdminSendResetHandler),
        (r"/password/forgot", reset.ForgotHandler),
        # Any path under it, so that no mistyped or cut link is ever logged as it came (see ResetHandler).
        (r"/password/reset/(.*)", reset.ResetHandler),
        (r"/(favicon\.ico)", tornado.web.StaticFileHandler, {"path": settings.static_path}),
    ]
    app = Application(
        routes,
        cookie_secret=settings.cookie_secret,
        key_version=max(settings.cookie_secret),
        xsrf_cookies=True,
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Lax", "secure": settings.secure_cookies},
        static_path=settings.static_path,
        static_url_prefix="/static/",
        login_url="/login",
        default_handler_class=public.NotFoundHandler,
        debug=False,
        autoreload=False,
        compress_response=False,
        xheaders=settings.xheaders,
        log_function=_log_request,
    )
    app.ctx = ctx
    app.csp = CSP
    app.security_headers = (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                            ("Referrer-Policy", "same-origin"), ("X-Frame-Options", "DENY"),
                            ("Cache-Control", "no-store"))
    return app


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """One access line per request, and the request metrics. No cookie, no body, no query values."""
    ctx: Context = handler.application.ctx  # type: ignore[attr-defined]
    status = handler.get_status()
    seconds = handler.request.request_time()
    route = getattr(handler, "route_name", None) or type(handler).__name__.removesuffix("Handler")
    method = method_label(handler.request.method)
    ctx.metrics.request(route, method, status, seconds)
    current = getattr(handler, "current", None)
    ctx.access.line(getattr(handler, "request_id", "-"), method, handler.request.path, status, seconds,
                    current.uid if current else None, route)
