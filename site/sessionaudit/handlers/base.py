"""BaseHandler: the session of each request, Jinja2 pages, plain error pages, security headers."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import time
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tornado.httputil
import tornado.web
from markupsafe import Markup

from .. import inputs
from ..passwords import HasherBusy
from ..redisconn import UNAVAILABLE, NotReplicated
from ..sessions import Current

log = logging.getLogger("sessionaudit.web")
security_log = logging.getLogger("sessionaudit.security")

COOKIE = "sid"
BUSY = 4  # requests in flight (this one included) past which refused attempts are answered after a wait
VERIFIED_COOKIES_MAX = 10_000  # session cookies whose signature is known good, kept by exact value
DEVICE_COOKIE = "device"  # names an account this browser has logged in to (throttle.py: device cookies)
DEVICE_COOKIE_DAYS = 365
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
FORM_LIMIT = 64 * 1024  # bytes of a form body; more gets 413
WRITE_PIECE = 64 * 1024  # bytes a streamed response hands the client at a time (write_taken)
REDIS_DOWN = UNAVAILABLE  # down, failing over, loading, or too few replicas: 503
NOT_REPLICATED = ("The site could not confirm that your change was stored safely. It may or may not have "
                  "taken effect: reload the page to see, and try again if it did not.")

ERROR_TEXT = {
    400: ("Bad request", "The request could not be understood."),
    403: ("Forbidden", "You do not have access to this page, or the form had expired. Go back, reload and try again."),
    404: ("Page not found", "There is no page at this address."),
    405: ("Method not allowed", "This page does not accept that kind of request."),
    413: ("Too large", "What you sent is larger than this site accepts."),
    429: ("Too many attempts", "Too many attempts. Wait a little and try again."),
    500: ("Something went wrong", "An error on our side stopped this page. It has been logged."),
    503: ("Temporarily unavailable", "The site cannot reach its data store right now. Try again in a moment."),
}

H = TypeVar("H", bound="BaseHandler")


# No form of the site has more than a handful of fields; a body with more is not one of ours.
FORM_FIELDS_MAX = 50
_BODY_CONFIG = tornado.httputil.ParseBodyConfig()
_BODY_CONFIG.urlencoded.max_arguments = FORM_FIELDS_MAX
_BODY_CONFIG.multipart.max_parts = FORM_FIELDS_MAX


def form(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Decorate every POST method: parse the (streamed, size-limited) form body, then check XSRF.

    Bodies are streamed so that an oversized one gets a real 413 page before it is read;
    Tornado's own check runs before the body arrives, so it is done here instead. A body that
    cannot be parsed (an encoding we do not take, a multipart body without a boundary, more fields
    than a form has) is a 400, before anything else is looked at.
    """
    @functools.wraps(method)
    async def wrapper(self: BaseHandler, *args: Any, **kwargs: Any) -> None:
        self.raise_deferred()
        self.parse_form()
        self.check_xsrf_cookie()
        await method(self, *args, **kwargs)
    wrapper.parses_form = True  # type: ignore[attr-defined]
    return wrapper


class BaseHandler(tornado.web.RequestHandler):
    """Every page handler. ``prepare`` loads the session once (one Redis round trip)."""

    # Set on handlers whose page lists the user's sessions: the same round trip fetches them.
    with_sessions = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A handler with a form (an @form method) has its body streamed, so that an oversized one
        # gets a real 413 page before it is read; the others (pages) skip Tornado's streaming path.
        super().__init_subclass__(**kwargs)
        cls._stream_request_body = any(getattr(getattr(cls, m, None), "parses_form", False)
                                       for m in ("post", "put", "patch", "delete"))

    _cookie_values: dict[str, str] | None = None
    _client_ip: str | None = None

    def initialize(self) -> None:
        self.ctx = self.application.ctx
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._body_ready = False
        self._deferred: Exception | None = None  # an error of prepare() kept until the body is read
        self.session_id: str | None = None
        self.current: Current | None = None
        self._xsrf_html: Markup | None = None
        self.ctx.in_flight += 1
        self._in_flight = True

    # -- request life cycle -------------------------------------------------------------

    def clear(self) -> None:
        """Reset headers and content (as Tornado's ``clear``), with headers built once per second.

        Every response carries the same headers but for the date and the request id; Tornado
        formats the date anew for each one, which costs more than the rest of them together.
        """
        self._headers = tornado.httputil.HTTPHeaders(self.application.response_headers())
        self.set_default_headers()
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = "OK"

    def set_default_headers(self) -> None:
        if not hasattr(self, "request_id"):  # clear() before an error page calls this again
            incoming = self.request.headers.get("X-Request-Id", "") if self.application.settings.get("xheaders") else ""
            # Not a secret, only unique: no system call for randomness on every request.
            self.request_id = incoming if REQUEST_ID.fullmatch(incoming) else f"{random.getrandbits(64):016x}"
        self._headers["X-Request-Id"] = self.request_id

    def compute_etag(self) -> None:
        return None  # pages are never cached (no-store): hashing each body would be wasted work

    def set_etag_header(self) -> None:
        pass

    def check_etag_header(self) -> bool:
        return False

    def get_cookie(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        """A cookie's value. The header is parsed once per request into a plain dict (Tornado's
        ``request.cookies`` builds a ``SimpleCookie`` of Morsels, a few times slower)."""
        cookies = self._cookie_values
        if cookies is None:
            header = self.request.headers.get("Cookie")
            cookies = self._cookie_values = tornado.httputil.parse_cookie(header) if header else {}
        return cookies.get(name, default)

    def check_xsrf_cookie(self) -> None:
        # Tornado calls this before prepare(), when a streamed body has not arrived; the
        # @form decorator calls it again once the body is parsed.
        if self._body_ready:
            try:
                super().check_xsrf_cookie()
            except tornado.web.HTTPError:
                self.ctx.security.warning("csrf", "CSRF check failed for %s %s from %s", self.request.method,
                                          self.request.path, self.request.remote_ip)
                raise

    async def prepare(self) -> None:
        """Reject oversized bodies at once, then resolve the session (missing or bad: anonymous).

        An error answered before a request's body is read makes the server close the connection
        with that body unread, and the kernel then resets it: the browser shows "connection
        reset" instead of our page. So for a request that carries a body (within the form limit),
        an error here (Redis down: 503, an unknown page: 404) is kept until the body has arrived,
        and raised then (``raise_deferred``, called by ``@form`` and by the methods a handler lacks).
        """
        length = self.request.headers.get("Content-Length")
        if length is not None:
            try:
                too_long = inputs.whole_number(length, maximum=10**19) > FORM_LIMIT
            except ValueError:
                raise tornado.web.HTTPError(400, "Content-Length is not a number.") from None
            if too_long:
                raise tornado.web.HTTPError(413)
        try:
            await self.load_session()
        except Exception as e:
            if not self._carries_body():
                raise
            self._deferred = e

    async def load_session(self) -> None:
        """Resolve this request's session (one round trip); a missing, forged or ended one is anonymous."""
        self.session_id, version = self._session_id_from_cookie()
        if self.session_id:
            self.current = await self.ctx.sessions.load(self.ctx.sessions.ref(self.session_id, version),
                                                        ip=self.client_ip, user_agent=self.user_agent,
                                                        with_sessions=self.with_sessions)
            if self.current is None:
                self.clear_session_cookie()
        self.current_user = self.current

    def _carries_body(self) -> bool:
        headers = self.request.headers
        return headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers

    def raise_deferred(self) -> None:
        """Raise the error that ``prepare`` kept until the body was read, if any."""
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error

    def parse_form(self) -> None:
        """Parse the streamed body as a form into the request's arguments; any malformed body is a 400."""
        if self._body_size > FORM_LIMIT:
            raise tornado.web.HTTPError(413)
        body = b"".join(self._chunks)
        self.request.body = body
        try:
            tornado.httputil.parse_body_arguments(
                self.request.headers.get("Content-Type", ""), body, self.request.body_arguments,
                self.request.files, self.request.headers, config=_BODY_CONFIG)
        except tornado.httputil.HTTPInputError:
            raise tornado.web.HTTPError(400, "The form could not be read.") from None
        for name, values in self.request.body_arguments.items():
            self.request.arguments.setdefault(name, []).extend(values)
        self._body_ready = True

    # The methods a handler does not have answer 405, as Tornado's do, but only once the body has
    # been read, and after an error kept from ``prepare``.
    async def post(self, *args: Any, **kwargs: Any) -> None:
        self.raise_deferred()
        raise tornado.web.HTTPError(405)

    put = patch = delete = options = post

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= FORM_LIMIT:
            self._chunks.append(chunk)

    def on_finish(self) -> None:
        self._count_out()

    def on_connection_close(self) -> None:
        # A client gone before its body arrived: Tornado's own handling ends the wait for the body
        # (the handler is then released), but it runs no method and calls no on_finish.
        super().on_connection_close()
        self._chunks = []
        self._count_out()

    async def flush_taken(self) -> None:
        """Flush, and wait until the client has taken it. A client that takes nothing for
        ``write_timeout`` seconds (a live follower or a download that stalled) raises TimeoutError, so
        that it is let go rather than kept in flight for ever. Keep what is flushed at once small
        (``write_taken``): a slow reader that keeps reading must not time out on a large flush."""
        await asyncio.wait_for(self.flush(), self.ctx.settings.write_timeout)

    async def write_taken(self, data: bytes | str) -> None:
        """Write ``data`` and wait until the client has taken it, a piece of at most ``WRITE_PIECE``
        bytes at a time (``flush_taken`` each): a client is let go when it takes nothing for
        ``write_timeout`` seconds, however large ``data`` is and however slowly it reads."""
        data = data.encode() if isinstance(data, str) else data
        for start in range(0, len(data), WRITE_PIECE):
            self.write(data[start:start + WRITE_PIECE])
            await self.flush_taken()

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """Tornado's, but a value that is not UTF-8 is never quoted back (in the 400 page or the log):
        it may be a password."""
        if isinstance(value, str):
            return value
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            # `name` is the handler's own (get_argument's), never the client's
            raise tornado.web.HTTPError(400, f"Invalid unicode in {name or 'the address'}.") from None

    def _count_out(self) -> None:
        """The request is no longer in flight (once, whichever of the two comes first)."""
        if self._in_flight:
            self._in_flight = False
            self.ctx.request_done()

    def _session_id_from_cookie(self) -> tuple[str | None, int | None]:
        """The session id in the cookie and the version of the cookie secret that signed it."""
        raw = self.get_cookie(COOKIE)
        if not raw:
            return None, None
        ctx = self.ctx
        # A cookie whose signature was checked before is known by its exact value: only its age
        # is checked again (the signature's HMAC and parsing were a tenth of a page's CPU).
        known = ctx.verified_cookies.get(raw)
        if known is not None and known[2] >= time.time() - ctx.cookie_max_age_days * 86400:
            return known[0], known[1]
        value = self.get_signed_cookie(COOKIE, value=raw, min_version=2, max_age_days=ctx.cookie_max_age_days)
        if value is None:
            ctx.security.warning("cookie", "forged or stale session cookie from %s", self.request.remote_ip)
            return None, None
        try:
            session_id = value.decode("ascii")
        except UnicodeDecodeError:
            return None, None
        if not 32 <= len(session_id) <= 64:
            return None, None
        version = tornado.web.get_signature_key_version(raw)
        if len(ctx.verified_cookies) >= VERIFIED_COOKIES_MAX:
            ctx.verified_cookies.clear()
        ctx.verified_cookies[raw] = (session_id, version, int(raw.split("|", 3)[2].partition(":")[2]))
        return session_id, version

    # -- session cookie -----------------------------------------------------------------

    def set_session_cookie(self, session_id: str) -> None:
        self.set_signed_cookie(COOKIE, session_id, expires_days=None, version=2, httponly=True,
                               samesite="Lax", secure=self.ctx.settings.secure_cookies, path="/")

    def clear_session_cookie(self) -> None:
        self.clear_cookie(COOKIE, path="/", httponly=True, samesite="Lax", secure=self.ctx.settings.secure_cookies)

    async def too_many(self, retry_after: int) -> None:
        """Set a 429 with ``Retry-After`` for an attempt that is refused, and while other requests keep
        the site busy, answer it only after a short wait (``refusal_delay``, at most the wait asked
        for): a client flooding refused attempts on a few connections then gets a few answers a
        second on each, and other people's pages keep their speed. Nothing else changes."""
        self.set_status(429)
        self.set_header("Retry-After", str(max(retry_after, 1)))
        if self.ctx.in_flight > BUSY:
            await asyncio.sleep(min(self.ctx.settings.refusal_delay, max(retry_after, 1)))

    def device_for(self, email: str) -> str | None:
        """The id of this browser's device cookie when it names ``email``'s account, else None."""
        raw = self.get_signed_cookie(DEVICE_COOKIE, min_version=2, max_age_days=DEVICE_COOKIE_DAYS + 1)
        try:
            return self.ctx.throttle.device_for(raw.decode("ascii") if raw else None, email)
        except UnicodeDecodeError:
            return None

    def set_device_cookie(self, email: str) -> None:
        """After a successful login: this browser is a known device of ``email``'s account for a year."""
        self.set_signed_cookie(DEVICE_COOKIE, self.ctx.throttle.device_cookie(email), expires_days=DEVICE_COOKIE_DAYS,
                               version=2, httponly=True, samesite="Lax", secure=self.ctx.settings.secure_cookies,
                               path="/login")

    def renew_xsrf(self) -> None:
        """A new XSRF token after login and logout: the old one dies with the old session."""
        self.clear_cookie("_xsrf", path="/")
        if hasattr(self, "_xsrf_token"):
            del self._xsrf_token

    # -- helpers ---------------------------------------------------------------------

    @property
    def client_ip(self) -> str:
        """The client's address in one spelling (``0300.0.2.0115`` is ``192.0.2.77``; an IPv4-mapped
        IPv6 address is its IPv4 address), so that throttles and the trail see one address as one."""
        ip = self._client_ip
        if ip is None:
            ip = self._client_ip = inputs.canonical_ip(self.request.remote_ip or "")
        return ip

    @property
    def user_agent(self) -> str:
        return self.request.headers.get("User-Agent", "")[:512]

    def redirect_to_next(self, default: str = "/account") -> None:
        self.redirect(safe_next(self.get_argument("next", ""), default), status=303)

    def get_login_url(self) -> str:
        return "/login"

    def now_ms(self) -> int:
        return int(self.ctx.clock() * 1000)

    # -- rendering ---------------------------------------------------------------------

    def render_string(self, template_name: str, **kwargs: Any) -> bytes:
        template = self.ctx.jinja.get_template(template_name)
        namespace = self.get_template_namespace()
        namespace.update(kwargs)
        return template.render(**namespace).encode()

    def get_template_namespace(self) -> dict[str, Any]:
        return {
            "handler": self,
            "request": self.request,
            "current": self.current,
            "static_url": self._static_url,
            "xsrf_form_html": self._xsrf_field,
            "xsrf": XsrfField(self),  # {{ xsrf }}: the hidden field, built when a page first shows it
            "now_ms": self.now_ms(),
        }

    def _static_url(self, path: str) -> str:
        """``static_url`` with its versioned URL worked out once per process (files do not change)."""
        return self.ctx.static_url(path)

    def _xsrf_field(self) -> Markup:
        """The hidden XSRF field, built once per request however many forms the page has.

        The field carries the browser's token under a fresh random mask, as Tornado's own does (so
        a page is safe to compress: BREACH). A ``_xsrf`` cookie of Tornado's version 2 is decoded
        once per process and kept by its exact value; anything else (no cookie yet, an old or odd
        one) goes through Tornado, which also sets the cookie when it must.
        """
        if self._xsrf_html is None:
            raw = self.get_cookie("_xsrf")
            known = self.ctx.xsrf_tokens.get(raw) if raw else None
            if known is None and raw and XSRF_V2.fullmatch(raw):
                _, mask, masked, timestamp = raw.split("|")
                token = _xor(bytes.fromhex(masked), bytes.fromhex(mask))
                if len(self.ctx.xsrf_tokens) >= VERIFIED_COOKIES_MAX:
                    self.ctx.xsrf_tokens.clear()
                known = self.ctx.xsrf_tokens[raw] = (token, timestamp)
            if known is None:
                self._xsrf_html = Markup(self.xsrf_form_html())  # noqa: S704 (Tornado escapes the token)
            else:
                token, timestamp = known
                mask = os.urandom(4)
                value = f"2|{mask.hex()}|{_xor(token, mask).hex()}|{timestamp}"  # hex and digits: nothing to escape
                self._xsrf_token = value.encode()  # what Tornado's xsrf_token would say, for code that asks it
                self._xsrf_html = Markup(f'<input type="hidden" name="_xsrf" value="{value}"/>')  # noqa: S704
        return self._xsrf_html

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, REDIS_DOWN):
            status_code = 503
            self.set_status(503)
            self.set_header("Retry-After", "5")
        elif isinstance(exc, HasherBusy):
            status_code = 503
            self.set_status(503)
            self.set_header("Retry-After", "2")
        title, text = ERROR_TEXT.get(status_code, (self._reason, "The request could not be completed."))
        if isinstance(exc, HasherBusy):
            text = "Many people are signing in right now. Try again in a moment."
        elif isinstance(exc, NotReplicated):
            text = NOT_REPLICATED
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code in (400, 403, 429):
            text = exc.log_message if status_code == 400 else text
        trace = None
        if self.ctx.settings.debug and kwargs.get("exc_info"):
            import traceback
            trace = "".join(traceback.format_exception(*kwargs["exc_info"]))
        self.clear_header("Content-Disposition")
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        try:
            self.finish(self.render_string("error.html", status=status_code, title=title, text=text, trace=trace))
        except Exception:
            log.exception("error page failed")
            self.finish(f"<!doctype html><title>{status_code}</title><h1>{status_code} {title}</h1>")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, REDIS_DOWN):
            self.ctx.metrics.redis_errors.inc()
            log.warning("Redis unavailable during %s %s: %s", self.request.method, self.request.path, value)
        elif isinstance(value, HasherBusy):
            log.warning("password hashing queue full; answered 503")
        elif isinstance(value, tornado.web.HTTPError) and value.status_code < 500:
            # Tornado logs every 4xx that has a message as a warning, so a flood of bad requests (forged
            # forms, odd query values) wrote one line a request. Each request has its access line; the
            # reason is logged at most once per 10 s per status, with a count of the ones left out.
            if value.log_message:
                message = value.log_message % value.args if value.args else value.log_message
                self.ctx.security.warning(f"http {value.status_code}", "%d %s %s (%s): %s", value.status_code,
                                          self.request.method, self.request.path, self.client_ip, message)
        else:
            super().log_exception(typ, value, tb)


class XsrfField:
    """The hidden XSRF field as a template value (``{{ xsrf }}``): built on first use, once per request.

    A value rather than a call: Jinja2 routes every call in a template through its context, which
    costs a page with a form per row more than the field itself.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: BaseHandler):
        self.handler = handler

    def __html__(self) -> str:
        return self.handler._xsrf_field()


XSRF_V2 = re.compile(r"2\|[0-9a-f]{8}\|(?:[0-9a-f]{2}){1,64}\|[0-9]{1,12}", re.ASCII)


def _xor(data: bytes, mask: bytes) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated (Tornado's masking of XSRF tokens)."""
    repeated = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")


MAX_NEXT = 2048  # characters of a local address to return to after a login or a form


def safe_next(target: str, default: str = "/account") -> str:
    """``target`` when it is a path on this site, else ``default`` (no open redirect).

    Any control character (C0, DEL, C1) makes it the default; other characters outside ASCII are
    percent-encoded, so the Location header carries nothing but ASCII. So does a target longer than
    ``MAX_NEXT``: it is kept in forms and in a pending login step, and a page's own path never needs it.
    """
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(unicodedata.category(c) == "Cc" for c in target):
        return default
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    target = urllib.parse.quote(target, safe="/?&=%#:@!$'()*+,;~-._[]")
    return target if len(target) <= MAX_NEXT else default


def authenticated(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Anonymous: GET/HEAD redirect to the login page with ``next``, anything else 403."""
    @functools.wraps(method)
    async def wrapper(self: BaseHandler, *args: Any, **kwargs: Any) -> None:
        if not self.current:
            if self.request.method in ("GET", "HEAD"):
                next_url = urllib.parse.quote(self.request.uri or "/", safe="")
                self.redirect(f"/login?next={next_url}")
                return
            raise tornado.web.HTTPError(403)
        await method(self, *args, **kwargs)
    return wrapper


def admin(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Like ``authenticated``, and a logged-in non-admin gets 403."""
    @functools.wraps(method)
    @authenticated
    async def wrapper(self: BaseHandler, *args: Any, **kwargs: Any) -> None:
        if not self.current or not self.current.admin:
            raise tornado.web.HTTPError(403)
        await method(self, *args, **kwargs)
    return wrapper
