"""The user's own account: their sessions (end one, end all others) and password change."""

from __future__ import annotations

import tornado.web

from .. import events
from ..passwords import MAX_PASSWORD_BYTES
from .base import BaseHandler, authenticated, form


class AccountHandler(BaseHandler):
    with_sessions = True

    @authenticated
    async def get(self) -> None:
        self.render("account.html", sessions=self.current.sessions if self.current else (),
                    changed=self.get_query_argument("changed", None) is not None)


class RevokeOwnHandler(BaseHandler):
    """End one of one's own sessions; ending this one logs this browser out."""

    @form
    @authenticated
    async def post(self, ref: str) -> None:
        assert self.current
        result = await self.ctx.sessions.end(ref, events.REVOKED, reason=events.BY_USER, actor=self.current.email,
                                             ip=self.client_ip, user_agent=self.user_agent, owner=self.current.uid)
        if result is None:
            raise tornado.web.HTTPError(404)
        if ref == self.current.ref:
            self.clear_session_cookie()
            self.renew_xsrf()
            self.redirect("/", status=303)
            return
        self.redirect("/account", status=303)


class RevokeOthersHandler(BaseHandler):
    @form
    @authenticated
    async def post(self) -> None:
        assert self.current
        await self.ctx.sessions.end_all(self.current.uid, events.BY_USER, actor=self.current.email,
                                        ip=self.client_ip, user_agent=self.user_agent, keep=self.current.ref)
        self.redirect("/account", status=303)


class PasswordHandler(BaseHandler):
    """Change the password: needs the current one; every session of the account ends, and this
    browser is signed in again at once under a new session id."""

    @authenticated
    async def get(self) -> None:
        self.render("password.html", error=None)

    @form
    @authenticated
    async def post(self) -> None:
        assert self.current
        ctx = self.ctx
        current_pw = self.get_argument("current_password", "", strip=False)[:MAX_PASSWORD_BYTES]
        new_pw = self.get_argument("password", "", strip=False)
        confirm = self.get_argument("password_confirm", "", strip=False)
        attempt = await ctx.throttle.check(self.current.email, self.client_ip)
        if attempt.retry_after > 0:
            self.set_header("Retry-After", str(attempt.retry_after))
            return self._fail(429, f"Too many failed attempts. Try again in {attempt.retry_after} seconds.")
        ok, _ = await ctx.passwords.verify(attempt.password_hash, current_pw)
        if not ok:
            await ctx.throttle.fail(self.current.email, self.client_ip, self.user_agent, events.BAD_CREDENTIALS,
                                    self.current.uid)
            return self._fail(400, "Your current password is not right.")
        if len(new_pw.encode()) > MAX_PASSWORD_BYTES:
            return self._fail(400, f"Passwords can be at most {MAX_PASSWORD_BYTES} bytes long.")
        if new_pw != confirm:
            return self._fail(400, "The two new passwords do not match.")
        if new_pw == current_pw:
            return self._fail(400, "The new password is the same as the current one.")
        problem, new_hash = await ctx.passwords.check_and_hash(new_pw, self.current.email)
        if problem or not new_hash:
            return self._fail(400, problem or "Choose another password.")
        await ctx.sessions.end_all(self.current.uid, events.PASSWORD_CHANGE, actor=self.current.email,
                                   ip=self.client_ip, user_agent=self.user_agent, set_field="hash",
                                   set_value=new_hash, cause=(events.PASSWORD_CHANGED, events.BY_USER),
                                   session=self.current.ref)
        created = await ctx.sessions.create(self.current.uid, self.current.email, ip=self.client_ip,
                                            user_agent=self.user_agent)
        if created:
            self.set_session_cookie(created[0])
        else:
            self.clear_session_cookie()
        self.renew_xsrf()
        self.redirect("/account?changed=1", status=303)

    def _fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.render("password.html", error=message)
