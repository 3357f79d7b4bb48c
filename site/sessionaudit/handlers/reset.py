"""Forgotten passwords: ask for a link by mail, then choose a new password through it."""

from __future__ import annotations

from .. import events
from ..passwords import MAX_PASSWORD_BYTES
from ..resets import RESET_PATH, TOKEN_TTL, Requested
from ..users import InvalidEmail, normalize_email
from .base import BaseHandler, form

SUBJECT = "Reset your Session Audit password"
FLASH_COOKIE = "flash"  # a one-time notice for the login page, which reads it without Redis
FLASH_RESET = "password-reset"
DECOY_TOKEN = "-" * 43  # the link of a decoy message: never stored, never sent


async def send_reset(handler: BaseHandler, email: str, *, actor: str = "", throttled: bool = True) -> Requested:
    """Record a reset request for ``email`` and, when the account exists and is enabled, queue its mail.

    The same work either way: one script, then a message on the mail queue, which returns at
    once; without an account the message is a decoy (composed later like the others, then
    dropped). So neither the answer, nor its time, nor the work after it tells whether the
    account exists.
    """
    ctx = handler.ctx
    asked = await ctx.resets.request(email, ip=handler.client_ip, user_agent=handler.user_agent, actor=actor,
                                     throttled=throttled)
    if not asked.retry_after:
        ctx.mailer.submit(email, SUBJECT, "mail/password_reset.txt", decoy=asked.token is None, email=email,
                          link=ctx.resets.link(asked.token or DECOY_TOKEN), minutes=TOKEN_TTL // 60,
                          ip=handler.client_ip or "an unknown address",
                          at=events.iso_ms(handler.now_ms())[:16].replace("T", " "), actor=actor)
    return asked


class ForgotHandler(BaseHandler):
    """Ask for a reset link: one answer whether or not the account exists."""

    def get(self) -> None:
        self.render("forgot.html", error=None, email="", sent=False)

    @form
    async def post(self) -> None:
        raw_email = self.get_argument("email", "")
        try:
            email = normalize_email(raw_email)
        except InvalidEmail as e:  # says nothing about accounts; recorded nowhere, costs Redis nothing
            self.set_status(400)
            return self.render("forgot.html", error=f"Enter a valid email address: {e}", email=raw_email[:254],
                               sent=False)
        asked = await send_reset(self, email)
        if asked.retry_after:
            self.ctx.security.warning("reset-throttled", "password reset requests throttled for %s from %s "
                                      "(retry after %d s)", email, self.client_ip, asked.retry_after)
            await self.too_many(asked.retry_after)
            return self.render("forgot.html", email=email, sent=False,
                               error=f"Too many requests. Try again in {asked.retry_after} seconds.")
        self.render("forgot.html", error=None, email=email, sent=True)


class ResetHandler(BaseHandler):
    """Choose a new password through a mailed link (``/password/reset/<token>``).

    The token is as good as a password for 30 minutes, so it must not be written anywhere: the
    request's path is replaced before anything can log it (the access line, a CSRF warning, an
    error report all read it), and the page asks browsers to send no Referer at all.
    """

    route_name = "PasswordReset"

    def initialize(self) -> None:
        super().initialize()
        if self.request.path.startswith(RESET_PATH):
            self.request.path = self.request.uri = RESET_PATH + "<token>"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Referrer-Policy", "no-referrer")

    async def get(self, token: str) -> None:
        email = await self.ctx.resets.check(token)
        if email is None:
            return self._invalid()
        self.render("reset.html", email=email, error=None)

    @form
    async def post(self, token: str) -> None:
        ctx = self.ctx
        email = await ctx.resets.check(token)
        if email is None:
            return self._invalid()
        password = self.get_argument("password", "", strip=False)
        confirm = self.get_argument("password_confirm", "", strip=False)
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            return self._again(email, f"Passwords can be at most {MAX_PASSWORD_BYTES} bytes long.")
        if password != confirm:
            return self._again(email, "The two passwords do not match.")
        problem, password_hash = await ctx.passwords.check_and_hash(password, email)
        if problem or not password_hash:
            return self._again(email, problem or "Choose another password.")
        uid = await ctx.resets.use(token, password_hash, ip=self.client_ip, user_agent=self.user_agent)
        if uid is None:  # used (or replaced) while the password was being hashed
            return self._invalid()
        if self.current and self.current.uid == uid:
            self.clear_session_cookie()  # its session has just ended with the others
        self.set_cookie(FLASH_COOKIE, FLASH_RESET, path="/login", max_age=300, httponly=True, samesite="Lax",
                        secure=ctx.settings.secure_cookies)
        self.redirect("/login", status=303)

    def _again(self, email: str, message: str) -> None:
        self.set_status(400)
        self.render("reset.html", email=email, error=message)

    def _invalid(self) -> None:
        self.set_status(400)
        self.render("reset_invalid.html", minutes=TOKEN_TTL // 60)
