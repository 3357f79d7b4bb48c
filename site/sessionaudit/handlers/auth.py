"""Register, log in, log out. (Forgotten passwords: reset.py.)"""

from __future__ import annotations

from .. import events
from ..factors import PENDING_SECONDS
from ..passwords import MAX_PASSWORD_BYTES
from ..users import InvalidEmail, normalize_email
from .base import BaseHandler, form, safe_next
from .reset import FLASH_COOKIE, FLASH_RESET
from .security import finish_login, set_login_step_cookie

BAD_LOGIN = "That email and password do not match an account."


class RegisterHandler(BaseHandler):
    def get(self) -> None:
        if self.current:
            self.redirect("/account")
            return
        self.render("register.html", error=None, email="")

    @form
    async def post(self) -> None:
        ctx = self.ctx
        raw_email = self.get_argument("email", "")
        password = self.get_argument("password", "", strip=False)
        confirm = self.get_argument("password_confirm", "", strip=False)
        # Refused registrations are recorded and throttled per address: probing which emails have
        # an account is as slow here as at /login.
        if await ctx.throttle.register_wait(self.client_ip):
            return await self._fail(events.THROTTLED, "", raw_email)
        try:
            email = normalize_email(raw_email)
        except InvalidEmail as e:
            return await self._fail(events.INVALID, f"Enter a valid email address: {e}", raw_email)
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            return await self._fail(events.INVALID, f"Passwords can be at most {MAX_PASSWORD_BYTES} bytes long.", email)
        if password != confirm:
            return await self._fail(events.INVALID, "The two passwords do not match.", email)
        if await ctx.users.get_by_email(email):
            return await self._fail(events.TAKEN, "An account with this email already exists. Log in instead.", email)
        problem, password_hash = await ctx.passwords.check_and_hash(password, email)
        if problem or not password_hash:
            return await self._fail(events.WEAK_PASSWORD, problem or "Choose another password.", email)
        uid = await ctx.users.create(email, password_hash, ip=self.client_ip, user_agent=self.user_agent)
        if uid is None:  # registered by someone else between the check and now
            return await self._fail(events.TAKEN, "An account with this email already exists. Log in instead.", email)
        created = await ctx.sessions.create(uid, email, ip=self.client_ip, user_agent=self.user_agent,
                                            old_ref=self.current.ref if self.current else "")
        if created:
            self.set_session_cookie(created[0])
            self.set_device_cookie(email)
            self.renew_xsrf()
        self.redirect("/account", status=303)

    async def _fail(self, reason: str, message: str, email: str) -> None:
        """Record the refusal (``register_failed``), then answer 400, or 429 once the address is throttled."""
        wait = await self.ctx.throttle.register_failed(email, self.client_ip, self.user_agent, reason)
        if reason == events.THROTTLED:
            self.ctx.security.warning("register-throttled", "registration throttled from %s (retry after %d s)",
                                      self.client_ip, wait)
            await self.too_many(wait)
            message = f"Too many attempts from your network. Try again in {max(wait, 1)} seconds."
        else:
            self.set_status(400)
        self.render("register.html", error=message, email=email)


class LoginHandler(BaseHandler):
    def get(self) -> None:
        notice = None
        if self.get_cookie(FLASH_COOKIE) == FLASH_RESET:  # just back from choosing a new password
            notice = "Your password has been changed and every session of your account has ended. " \
                     "Log in with the new password."
            self.clear_cookie(FLASH_COOKIE, path="/login")
        self.render("login.html", error=None, email="", next=safe_next(self.get_argument("next", ""), ""),
                    notice=notice)

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
        device = self.device_for(email)
        attempt = await ctx.throttle.check(email or "-", self.client_ip, device, refuse_as=self.user_agent)
        if attempt.retry_after > 0:  # recorded as refused by the same script
            ctx.metrics.login("throttled")
            ctx.security.warning("login-throttled", "login throttled for %s from %s (retry after %d s)",
                                 email or "an invalid address", self.client_ip, attempt.retry_after)
            await self.too_many(attempt.retry_after)
            return self.render("login.html", email=raw_email, next=next_url,
                               error=f"Too many failed attempts. Try again in {attempt.retry_after} seconds.")
        ok, new_hash = await ctx.passwords.verify(attempt.password_hash, password)
        step = None
        if ok and not attempt.disabled and attempt.uid:
            # One script: a session, or (two-step sign-in on) a pending second step instead.
            step = await ctx.factors.password_login(
                attempt.uid, email, ip=self.client_ip, user_agent=self.user_agent,
                old_ref=self.current.ref if self.current else "", new_hash=new_hash or "",
                old_hash=attempt.password_hash or "", device=device, next_url=next_url)
        if step is None:
            await ctx.throttle.fail(email, self.client_ip, self.user_agent, events.BAD_CREDENTIALS, attempt.uid,
                                    device)
            ctx.metrics.login("failed")
            self.set_status(401)
            return self.render("login.html", error=BAD_LOGIN, email=raw_email, next=next_url)
        if step.pending:
            set_login_step_cookie(self, step.pending, self.now_ms() + PENDING_SECONDS * 1000)
            self.redirect("/login/verify", status=303)
            return
        assert step.session
        finish_login(self, step.session[0], email, next_url)


class LogoutHandler(BaseHandler):
    @form
    async def post(self) -> None:
        if self.current:
            await self.ctx.sessions.end(self.current.ref, events.LOGOUT, ip=self.client_ip,
                                        user_agent=self.user_agent)
        self.clear_session_cookie()
        self.renew_xsrf()
        self.redirect("/", status=303)
