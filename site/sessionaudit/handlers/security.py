"""Second factors: the account's security page (TOTP, recovery codes, passkeys), the second step of a
two-step login, and signing in with a passkey."""

from __future__ import annotations

import tornado.web

from .. import events
from ..factors import PENDING_SECONDS
from ..passkeys import MAX_PASSKEYS
from ..passwords import MAX_PASSWORD_BYTES
from ..views import ua_summary
from .base import BaseHandler, authenticated, form, safe_next

REAUTH = "To add a second factor, enter your password first."
LOGIN_STEP_COOKIE = "login_step"  # the pending second step's id and deadline, for this browser only
BAD_CODE = "That code is not right. Check the time on your phone, or use a recovery code."
REPLAYED_CODE = "That code can no longer be used: each code works once. Wait for your app to show the next one."
NOTICES = {
    "totp-off": "Two-step sign-in is off. Your recovery codes no longer work.",
    "passkey-added": "Your passkey was added. You can sign in with it on the login page, without your password.",
    "passkey-removed": "The passkey was removed.",
    "passkey-renamed": "The passkey was renamed.",
    "reauth": REAUTH,
}
# Adding a factor from a session that began more than this long ago, or that moved since (another
# address or browser: a stolen cookie looks like that), needs the password first: a cookie alone
# must not let anyone add a way into the account that outlives a password change.
FRESH_SIGN_IN_MS = 10 * 60 * 1000
PASSKEY_ERRORS = {
    "invalid": "Your browser's answer could not be verified. Try again.",
    "expired": "That took too long. Try again.",
    "used": "That took too long. Try again.",
    "exists": "This passkey is already registered.",
    "full": f"An account can have at most {MAX_PASSKEYS} passkeys. Remove one first.",
    "gone": "Your account could not be found.",
}


def set_login_step_cookie(handler: BaseHandler, token: str, deadline_ms: int) -> None:
    """The pending second step goes to this browser only: its id (and deadline) in a signed cookie."""
    handler.set_signed_cookie(LOGIN_STEP_COOKIE, f"{token}.{deadline_ms}", expires_days=None, version=2,
                              max_age=PENDING_SECONDS, httponly=True, samesite="Lax",
                              secure=handler.ctx.settings.secure_cookies, path="/login")


def clear_login_step_cookie(handler: BaseHandler) -> None:
    handler.clear_cookie(LOGIN_STEP_COOKIE, path="/login", httponly=True, samesite="Lax",
                         secure=handler.ctx.settings.secure_cookies)


def login_step(handler: BaseHandler) -> tuple[str, int] | None:
    """(id, deadline ms) of this browser's pending second step when its cookie is genuine and not past
    its deadline; None otherwise. Costs no Redis."""
    raw = handler.get_signed_cookie(LOGIN_STEP_COOKIE, max_age_days=1, min_version=2)
    try:
        token, _, deadline = (raw or b"").decode("ascii").partition(".")
    except UnicodeDecodeError:
        return None
    if not token or not deadline.isdigit() or handler.now_ms() >= int(deadline):
        return None
    return token, int(deadline)


def finish_login(handler: BaseHandler, session_id: str, email: str, next_url: str) -> None:
    """A login is done: the session cookie, the device cookie, a new XSRF token, then on to ``next``."""
    handler.ctx.metrics.login("ok")
    handler.set_session_cookie(session_id)
    handler.set_device_cookie(email)
    if handler.get_cookie(LOGIN_STEP_COOKIE):
        clear_login_step_cookie(handler)
    handler.renew_xsrf()
    handler.redirect(safe_next(next_url), status=303)


# -- the account's security page ---------------------------------------------------------------------

class FactorBase(BaseHandler):
    """What the handlers that change an account's factors share: who may, and the password check."""

    # The session's sign-in time and whether it moved come with the page's one round trip.
    with_sessions = True

    def signed_in_here_recently(self) -> bool:
        """The session began less than FRESH_SIGN_IN_MS ago and was never used from another address or
        browser than its sign-in's."""
        current = self.current
        assert current
        this = next((s for s in current.sessions if s.ref == current.ref), None)
        return (this is not None and not this.moved
                and self.ctx.sessions.now_ms() - current.created <= FRESH_SIGN_IN_MS)

    async def password_refused(self) -> tuple[int, str] | None:
        """The form's ``password`` checked against the account (throttled and recorded as logins are):
        None when right, else the status and message to answer with."""
        assert self.current
        ctx = self.ctx
        password = self.get_argument("password", "", strip=False)[:MAX_PASSWORD_BYTES]
        device = self.device_for(self.current.email)  # as at login: others' failures do not lock this browser
        attempt = await ctx.throttle.check(self.current.email, self.client_ip, device)
        if attempt.retry_after > 0:
            self.set_header("Retry-After", str(attempt.retry_after))
            return 429, f"Too many failed attempts. Try again in {attempt.retry_after} seconds."
        ok, _ = await ctx.passwords.verify(attempt.password_hash, password)
        if not ok:
            await ctx.throttle.fail(self.current.email, self.client_ip, self.user_agent, events.BAD_CREDENTIALS,
                                    self.current.uid, device)
            return 400, "Your password is not right."
        return None

    async def may_add_factor(self) -> tuple[int, str] | None:
        """None when this session may add a factor now (signed in here recently, or the right password
        in the form); else the status and message to answer with."""
        if self.signed_in_here_recently():
            return None
        if not self.get_argument("password", "", strip=False):
            return 400, REAUTH
        return await self.password_refused()


class SecurityBase(FactorBase):
    async def show(self, status: int = 200, error: str | None = None) -> None:
        """The security page (again, with ``error``); it reads the factors: one more round trip."""
        assert self.current
        factors = await self.ctx.factors.view(self.current.uid)
        self.set_status(status)
        notice = NOTICES.get(self.get_query_argument("done", ""))
        self.render("security.html", factors=factors, error=error, notice=notice, max_passkeys=MAX_PASSKEYS,
                    reauth=not self.signed_in_here_recently())

    async def check_password(self) -> bool | None:
        """The form's ``password`` checked against the account (throttled as logins are): True when
        right; False when wrong (recorded, and the page answered); None when throttled (answered)."""
        refused = await self.password_refused()
        if refused:
            await self.show(*refused)
            return None if refused[0] == 429 else False
        return True


class SecurityHandler(SecurityBase):
    @authenticated
    async def get(self) -> None:
        await self.show()


class TotpSetupHandler(SecurityBase):
    """Start setting up an authenticator app: its secret as text and as a QR code."""

    @form
    @authenticated
    async def post(self) -> None:
        assert self.current
        refused = await self.may_add_factor()
        if refused:
            return await self.show(*refused)
        setup = await self.ctx.factors.begin_setup(self.current.uid, self.current.email)
        if setup is None:
            return await self.show(400, "Two-step sign-in is already on.")
        self.render("totp_setup.html", setup=setup, error=None)


class TotpConfirmHandler(SecurityBase):
    """A code from the app turns TOTP on; the recovery codes are shown once."""

    @form
    @authenticated
    async def post(self) -> None:
        assert self.current
        ctx = self.ctx
        # The same gate as the start: a setup begun while fresh is not finished from a session that
        # has since moved or aged (its wrong-code page would show the secret).
        refused = await self.may_add_factor()
        if refused:
            return await self.show(*refused)
        result = await ctx.factors.confirm_setup(self.current.uid, self.get_argument("code", ""), ref=self.current.ref,
                                                 ip=self.client_ip, user_agent=self.user_agent)
        if isinstance(result, list):
            return self.render("recovery_codes.html", codes=result)
        if result == "bad_code":
            setup = await ctx.factors.current_setup(self.current.uid, self.current.email)
            if setup is not None:
                self.set_status(400)
                return self.render("totp_setup.html", setup=setup,
                                   error="That code is not right. Type the six digits your app shows now.")
            result = "expired"
        if result == "on":
            return await self.show(400, "Two-step sign-in is already on.")
        await self.show(400, "Setting up took too long. Start again.")


class TotpDisableHandler(SecurityBase):
    """Turn TOTP off: the password and a code (from the app, or a recovery code)."""

    @form
    @authenticated
    async def post(self) -> None:
        assert self.current
        ctx = self.ctx
        sealed = await ctx.factors.sealed_secret(self.current.uid)
        if not sealed:
            return await self.show(400, "Two-step sign-in is not on.")
        if not await self.check_password():
            return
        result = await ctx.factors.disable(self.current.uid, sealed, self.get_argument("code", ""),
                                           ref=self.current.ref, ip=self.client_ip, user_agent=self.user_agent)
        if result == "bad_code":
            await ctx.throttle.fail(self.current.email, self.client_ip, self.user_agent, events.BAD_CODE,
                                    self.current.uid)
            return await self.show(400, BAD_CODE)
        if result != "ok":
            return await self.show(400, "Two-step sign-in is not on.")
        self.redirect("/account/security?done=totp-off", status=303)


class PasskeyOptionsHandler(FactorBase):
    """The options for adding a passkey (JSON, for static/passkeys.js)."""

    @form
    @authenticated
    async def post(self) -> None:
        assert self.current
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if not self.ctx.passkeys.available:
            self.set_status(400)
            return self.finish({"error": "Passkeys need the site to be reached by a host name, not an address."})
        refused = await self.may_add_factor()
        if refused:
            self.set_status(refused[0])
            return self.finish({"error": refused[1], "reauth": refused[1] == REAUTH})
        options = await self.ctx.passkeys.registration_options(self.current.uid, self.current.email, self.current.ref)
        if options is None:
            self.set_status(400)
            return self.finish({"error": PASSKEY_ERRORS["full"]})
        self.finish(options)


class PasskeyAddHandler(SecurityBase):
    @form
    @authenticated
    async def post(self) -> None:
        assert self.current
        ctx = self.ctx
        if not ctx.passkeys.available:
            return await self.show(400, "Passkeys are not available at this site's address.")
        # The same gate as the options: a challenge fetched while fresh is not used after a move.
        refused = await self.may_add_factor()
        if refused:
            return await self.show(*refused)
        result = await ctx.passkeys.add(self.current.uid, self.current.ref, self.get_argument("credential", ""),
                                        self.get_argument("name", "") or self._default_name(), ip=self.client_ip,
                                        user_agent=self.user_agent)
        if result != "ok":
            return await self.show(400, PASSKEY_ERRORS.get(result, PASSKEY_ERRORS["invalid"]))
        self.redirect("/account/security?done=passkey-added", status=303)

    def _default_name(self) -> str:
        return f"Passkey on {ua_summary(self.user_agent)}"


class PasskeyRenameHandler(SecurityBase):
    @form
    @authenticated
    async def post(self, ref: str) -> None:
        assert self.current
        if not self.get_argument("name", "").strip():
            return await self.show(400, "Give the passkey a name.")
        if not await self.ctx.passkeys.rename(self.current.uid, ref, self.get_argument("name", "")):
            raise tornado.web.HTTPError(404)
        self.redirect("/account/security?done=passkey-renamed", status=303)


class PasskeyRemoveHandler(SecurityBase):
    """Remove a passkey; the account's last factor only with the password."""

    @form
    @authenticated
    async def post(self, ref: str) -> None:
        assert self.current
        reauthenticated = False
        if self.get_argument("password", "", strip=False):
            checked = await self.check_password()
            if not checked:
                return
            reauthenticated = True
        result = await self.ctx.passkeys.remove(self.current.uid, ref, reauthenticated=reauthenticated,
                                                session_ref=self.current.ref, ip=self.client_ip,
                                                user_agent=self.user_agent)
        if result is None:
            raise tornado.web.HTTPError(404)
        if result == "last":
            return await self.show(400, "This is the last second factor of your account: enter your password to "
                                        "remove it.")
        self.redirect("/account/security?done=passkey-removed", status=303)


# -- signing in -------------------------------------------------------------------------------------

class LoginVerifyHandler(BaseHandler):
    """The second step of a login: a code from the authenticator app, or a recovery code."""

    def get(self) -> None:
        if login_step(self) is None:
            return self.expired()
        self.render("login_verify.html", error=None)

    @form
    async def post(self) -> None:
        ctx = self.ctx
        step = login_step(self)
        pending = await ctx.factors.pending(step[0]) if step else None
        if pending is None:
            return self.expired()
        device = self.device_for(pending.email)
        attempt = await ctx.throttle.check(pending.email, self.client_ip, device)
        if attempt.retry_after > 0:
            await ctx.throttle.refuse(pending.email, self.client_ip, self.user_agent, attempt, device)
            ctx.metrics.login("throttled")
            ctx.security.warning("login-throttled", "second step throttled for %s from %s (retry after %d s)",
                                 pending.email, self.client_ip, attempt.retry_after)
            await self.too_many(attempt.retry_after)
            return self.render("login_verify.html",
                               error=f"Too many failed attempts. Try again in {attempt.retry_after} seconds.")
        outcome, created = await ctx.factors.finish_login(
            pending, self.get_argument("code", ""), ip=self.client_ip, user_agent=self.user_agent,
            old_ref=self.current.ref if self.current else "", device=device)
        if outcome in ("bad_code", "replayed"):  # a replay is recorded and throttled as a wrong code
            await ctx.throttle.fail(pending.email, self.client_ip, self.user_agent, events.BAD_CODE, pending.uid,
                                    device)
            ctx.metrics.login("failed")
            self.set_status(401)
            return self.render("login_verify.html", error=REPLAYED_CODE if outcome == "replayed" else BAD_CODE)
        if created is None:
            return self.expired()
        finish_login(self, created[0], pending.email, pending.next_url)

    def expired(self) -> None:
        clear_login_step_cookie(self)
        self.set_status(400)
        self.render("login_expired.html", minutes=PENDING_SECONDS // 60)


class PasskeyLoginOptionsHandler(BaseHandler):
    """The options for signing in with any passkey of this site (JSON, for static/passkeys.js); no Redis."""

    @form
    async def post(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if not self.ctx.passkeys.available:
            self.set_status(400)
            return self.finish({"error": "Passkeys need the site to be reached by a host name, not an address."})
        self.finish(self.ctx.passkeys.authentication_options())


class PasskeyLoginHandler(BaseHandler):
    """Sign in with a passkey: it proves possession and user verification, so no second step."""

    @form
    async def post(self) -> None:
        ctx = self.ctx
        passkeys = ctx.passkeys
        next_url = safe_next(self.get_argument("next", ""), "")
        assertion = passkeys.parse_assertion(self.get_argument("credential", "")) if passkeys.available else None
        if assertion is None:
            return self.fail(400, next_url, "That sign-in took too long or could not be read. Try again.")
        stored = await passkeys.stored(assertion.ref)
        if stored is None:
            ctx.security.warning("passkey-unknown", "sign-in with an unknown passkey from %s", self.client_ip)
            return self.fail(400, next_url, "This passkey is not registered here: it may have been removed. "
                                            "Log in with your email and password.")
        device = self.device_for(stored.email)
        verified = passkeys.verify(assertion, stored)
        outcome, created = "invalid", None
        if verified is not None:
            outcome, created = await passkeys.finish_login(assertion, stored, verified, ip=self.client_ip,
                                                           user_agent=self.user_agent, device=device,
                                                           old_ref=self.current.ref if self.current else "")
        if created is not None:
            return finish_login(self, created[0], stored.email, next_url)
        if outcome in ("used", "gone"):
            return self.fail(400, next_url, "That sign-in took too long or could not be read. Try again.")
        # A signature that does not verify, a sign count that went back (a cloned authenticator), a
        # disabled account: a failed login, recorded and throttled as a wrong password is.
        if outcome == "count":
            ctx.security.warning("passkey-count", "passkey %s of user %s: sign count did not grow (cloned?)",
                                 stored.ref, stored.uid)
        attempt = await ctx.throttle.check(stored.email, self.client_ip, device)
        if attempt.retry_after > 0:
            await ctx.throttle.refuse(stored.email, self.client_ip, self.user_agent, attempt, device)
            ctx.metrics.login("throttled")
            self.set_header("Retry-After", str(attempt.retry_after))
            return self.fail(429, next_url, f"Too many failed attempts. Try again in {attempt.retry_after} seconds.")
        await ctx.throttle.fail(stored.email, self.client_ip, self.user_agent, events.BAD_CREDENTIALS, stored.uid,
                                device)
        ctx.metrics.login("failed")
        self.fail(401, next_url, "The passkey could not be verified.")

    def fail(self, status: int, next_url: str, message: str) -> None:
        self.set_status(status)
        self.render("login.html", error=message, email="", next=next_url)
