"""Register, log in, log out."""

from __future__ import annotations

from .. import events
from ..passwords import MAX_PASSWORD_BYTES
from ..users import InvalidEmail, normalize_email
from .base import BaseHandler, form, safe_next, security_log

BAD_LOGIN = "That email and password do not match an account."


class RegisterHandler(BaseHandler):
    def get(self) -> None:
        if self.current:
            self.redirect("/account")
            return
        self.render("register.html", error=None, email="")

    @form
    async def post(self) -> None:
        raw_email = self.get_argument("email", "")
        password = self.get_argument("password", "", strip=False)
        confirm = self.get_argument("password_confirm", "", strip=False)
        try:
            email = normalize_email(raw_email)
        except InvalidEmail as e:
            return self._fail(f"Enter a valid email address: {e}", raw_email)
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            return self._fail(f"Passwords can be at most {MAX_PASSWORD_BYTES} bytes long.", email)
        if password != confirm:
            return self._fail("The two passwords do not match.", email)
        ctx = self.ctx
        if await ctx.users.get_by_email(email):
            return self._fail("An account with this email already exists. Log in instead.", email)
        problem, password_hash = await ctx.passwords.check_and_hash(password, email)
        if problem or not password_hash:
            return self._fail(problem or "Choose another password.", email)
        uid = await ctx.users.create(email, password_hash, ip=self.client_ip, user_agent=self.user_agent)
        if uid is None:  # registered by someone else between the check and now
            return self._fail("An account with this email already exists. Log in instead.", email)
        created = await ctx.sessions.create(uid, email, ip=self.client_ip, user_agent=self.user_agent,
                                            old_ref=self.current.ref if self.current else "")
        if created:
            self.set_session_cookie(created[0])
            self.renew_xsrf()
        self.redirect("/account", status=303)

    def _fail(self, message: str, email: str) -> None:
        self.set_status(400)
        self.render("register.html", error=message, email=email)


class LoginHandler(BaseHandler):
    def get(self) -> None:
        self.render("login.html", error=None, email="", next=safe_next(self.get_argument("next", ""), ""))

    @form
    async def post(self) -> None:
        ctx = self.ctx
        raw_email = self.get_argument("email", "")
        password = self.get_argument("password", "", strip=False)[:MAX_PASSWORD_BYTES]
        next_url = safe_next(self.get_argument("next", ""), "")
        try:
            email = normalize_email(raw_email)
        except InvalidEmail:
            email = ""
        # An address that cannot exist is treated like an unknown one: same work, same answer.
        attempt = await ctx.throttle.check(email or "-", self.client_ip)
        if attempt.retry_after > 0:
            await ctx.throttle.fail(email, self.client_ip, self.user_agent, events.THROTTLED, attempt.uid)
            ctx.metrics.login("throttled")
            security_log.warning("login throttled for %s from %s (retry after %d s)", email or "an invalid address",
                                 self.client_ip, attempt.retry_after)
            self.set_status(429)
            self.set_header("Retry-After", str(attempt.retry_after))
            return self.render("login.html", email=raw_email, next=next_url,
                               error=f"Too many failed attempts. Try again in {attempt.retry_after} seconds.")
        ok, new_hash = await ctx.passwords.verify(attempt.password_hash, password)
        created = None
        if ok and not attempt.disabled and attempt.uid:
            created = await ctx.sessions.create(
                attempt.uid, email, ip=self.client_ip, user_agent=self.user_agent,
                old_ref=self.current.ref if self.current else "", new_hash=new_hash or "",
                old_hash=attempt.password_hash or "")
        if created is None:
            await ctx.throttle.fail(email, self.client_ip, self.user_agent, events.BAD_CREDENTIALS, attempt.uid)
            ctx.metrics.login("failed")
            self.set_status(401)
            return self.render("login.html", error=BAD_LOGIN, email=raw_email, next=next_url)
        ctx.metrics.login("ok")
        self.set_session_cookie(created[0])
        self.renew_xsrf()
        self.redirect(next_url or "/account", status=303)


class LogoutHandler(BaseHandler):
    @form
    async def post(self) -> None:
        if self.current:
            await self.ctx.sessions.end(self.current.ref, events.LOGOUT, ip=self.client_ip,
                                        user_agent=self.user_agent)
        self.clear_session_cookie()
        self.renew_xsrf()
        self.redirect("/", status=303)
