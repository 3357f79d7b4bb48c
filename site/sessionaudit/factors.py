"""Second factors: TOTP (RFC 6238) with recovery codes, the pending step of a two-step login, and
what a user's factors are (the security page, the admin's user page, the admin's reset).

A TOTP secret is stored only sealed (AES-256-GCM, bound to its user), while set up
(``sa:totp:setup:<uid>``, ten minutes) and once on (``sa:mfa:<uid>``). The key that seals it (and
keys the recovery codes' HMACs) is made once per Redis and kept there (``sa:mfa:key``) sealed under
a key derived from COOKIE_SECRET; each process re-seals it under the newest version of that secret
when it starts, so rotating COOKIE_SECRET (``1:old,2:new``, later ``2:new``) loses no factor.
A code is accepted at most once: the script that accepts it also checks and moves the user's last
accepted time step, so a code (or an older one) is refused afterwards by every process on the same
Redis. Recovery codes are 60 random bits each, stored only as HMACs (they cannot be guessed, so a
slow hash would buy nothing); a used one is removed in the script that accepts it.

Two-step login: the right password with TOTP on stores a pending step (``sa:lp:<hash of its id>``,
five minutes) instead of a session; the id goes to this browser only, in a signed cookie. The
script that accepts the code also consumes the step and creates the session with its `login`
event (``sessions.LUA_LOGIN``), so a code, its step and a session are one change.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import pyotp
import redis.asyncio as aioredis
import segno
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import events, keys
from .config import Settings
from .sessions import LUA_LOGIN, SessionStore

TOTP_PERIOD = 30  # seconds (RFC 6238); SHA-1 and 6 digits, what every authenticator app reads
TOTP_DIGITS = 6
TOTP_DRIFT = 1  # steps of clock drift accepted either way
SETUP_SECONDS = 600  # an unconfirmed TOTP secret lives this long
PENDING_SECONDS = 300  # the second step of a login must be done within this
RECOVERY_CODES = 10
RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base32: no i, l, o, u
RECOVERY_LENGTH = 12  # characters: 60 bits
RECOVERY_FIX = str.maketrans({"o": "0", "i": "1", "l": "1"})  # what people misread in Crockford's alphabet
DATA_KEY_LABEL = "sessionaudit second factors"  # HKDF label of the key that seals the data key
SIX_DIGITS = re.compile(r"[0-9]{6}")
TOTP, RECOVERY = events.BY_TOTP, events.BY_RECOVERY_CODE  # the two kinds of code, named as the login reasons

# Accept a second-factor code for a user: `kind` 'totp' with its time step, or 'recovery_code' with
# the code's HMAC (or several, space-separated). code_ok only checks: it returns 'ok' and
# what to take, 'off' (no TOTP) or 'used' (a step not after the last accepted one, or no such unused
# recovery code); take_code then writes, after the script's event.
LUA_CODES = r"""
local function code_ok(uid, kind, value)
  local m = redis.call('HMGET', 'sa:mfa:' .. uid, 'totp', 'step')
  if not m[1] then return 'off' end
  if kind == 'totp' then
    if tonumber(value) <= (tonumber(m[2]) or -1) then return 'used' end
    return 'ok', value
  end
  for h in string.gmatch(value, '%S+') do
    if redis.call('SISMEMBER', 'sa:rc:' .. uid, h) == 1 then return 'ok', h end
  end
  return 'used'
end

local function take_code(uid, kind, value)
  if kind == 'totp' then redis.call('HSET', 'sa:mfa:' .. uid, 'step', value)
  else redis.call('SREM', 'sa:rc:' .. uid, value) end
end
"""

# Start (or resume) TOTP setup. ARGV: now, uid, sealed secret, deadline, ttl_ms
# Returns the sealed secret being set up (an unexpired earlier one wins), or false when TOTP is on.
SETUP = r"""
local now, uid = tonumber(ARGV[1]), ARGV[2]
if redis.call('HEXISTS', 'sa:mfa:' .. uid, 'totp') == 1 then return false end
local key = 'sa:totp:setup:' .. uid
local old = redis.call('HMGET', key, 'c', 'x')
if old[1] and now < tonumber(old[2]) then return old[1] end
redis.call('HSET', key, 'c', ARGV[3], 'x', ARGV[4])
redis.call('PEXPIRE', key, tonumber(ARGV[5]))
return ARGV[3]
"""

# The secret being set up. ARGV: now, uid. Returns it sealed, or false (none, or expired).
SETUP_SEALED = r"""
local s = redis.call('HMGET', 'sa:totp:setup:' .. ARGV[2], 'c', 'x')
if not s[1] or tonumber(ARGV[1]) >= tonumber(s[2]) then return false end
return s[1]
"""

# Turn TOTP on with the secret that was set up and confirmed by a code of time step ARGV[4].
# ARGV: now, uid, sealed secret, step, session ref, ip, ua, recovery code HMACs...
# Returns 'ok', 'expired' (no such setup any more) or 'on' (already on).
ENABLE = r"""
local now, uid = tonumber(ARGV[1]), ARGV[2]
local setup = redis.call('HMGET', 'sa:totp:setup:' .. uid, 'c', 'x')
if setup[1] ~= ARGV[3] or now >= tonumber(setup[2]) then return 'expired' end
if redis.call('HEXISTS', 'sa:mfa:' .. uid, 'totp') == 1 then return 'on' end
local email = redis.call('HGET', 'sa:user:' .. uid, 'email')
if not email then return 'expired' end
emit(now, {t = 'mfa_enabled', u = uid, e = email, s = ARGV[5], i = ARGV[6], g = ARGV[7]})
redis.call('HSET', 'sa:mfa:' .. uid, 'totp', ARGV[3], 'step', ARGV[4], 'since', ARGV[1])
redis.call('DEL', 'sa:rc:' .. uid, 'sa:totp:setup:' .. uid)
for i = 8, #ARGV do redis.call('SADD', 'sa:rc:' .. uid, ARGV[i]) end
return 'ok'
"""

# Turn TOTP off with a code (the caller checked the password). ARGV: now, uid, kind, value, ref, ip, ua
# Returns 'ok', 'off' or 'used'.
DISABLE = LUA_CODES + r"""
local now, uid = tonumber(ARGV[1]), ARGV[2]
local why = code_ok(uid, ARGV[3], ARGV[4])
if why ~= 'ok' then return why end
local email = redis.call('HGET', 'sa:user:' .. uid, 'email') or ''
emit(now, {t = 'mfa_disabled', u = uid, e = email, s = ARGV[5], i = ARGV[6], g = ARGV[7], r = 'user'})
redis.call('DEL', 'sa:mfa:' .. uid, 'sa:rc:' .. uid)
return 'ok'
"""

# The password was right. With TOTP on: a pending step instead of a session (no event yet).
# ARGV: now, pending hash, deadline, ttl_ms, next, then the 14 arguments of login_session (from 6).
# Returns 'pending', 'session' or false (account gone or disabled).
PASSWORD_LOGIN = LUA_LOGIN + r"""
local now, uid = tonumber(ARGV[1]), ARGV[7]
if redis.call('HEXISTS', 'sa:mfa:' .. uid, 'totp') == 1 then
  local user = redis.call('HMGET', 'sa:user:' .. uid, 'email', 'disabled', 'hash')
  if not user[1] or user[2] == '1' then return false end
  local key = 'sa:lp:' .. ARGV[2]
  redis.call('HSET', key, 'u', uid, 'e', ARGV[16], 'n', ARGV[5], 'x', ARGV[3])
  redis.call('PEXPIRE', key, tonumber(ARGV[4]))
  -- The password step is done: an upgraded hash is kept. Failures are not cleared before the code.
  if ARGV[14] ~= '' and user[3] == ARGV[15] then redis.call('HSET', 'sa:user:' .. uid, 'hash', ARGV[14]) end
  return 'pending'
end
if not login_session(now, 6) then return false end
return 'session'
"""

# A pending step and the sealed TOTP secret of its user. ARGV: now, pending hash.
# Returns {uid, email, next, deadline, sealed secret or ''}, or false (none, or expired).
PENDING = r"""
local p = redis.call('HMGET', 'sa:lp:' .. ARGV[2], 'u', 'e', 'n', 'x')
if not p[1] or tonumber(ARGV[1]) >= tonumber(p[4]) then return false end
return {p[1], p[2], p[3], p[4], redis.call('HGET', 'sa:mfa:' .. p[1], 'totp') or ''}
"""

# Finish a two-step login: consume the pending step and the code, create the session and its event.
# ARGV: now, pending hash, uid, kind, value, then the 14 arguments of login_session (from 6).
# Returns 'ok', 'expired' (no such step, or past its deadline), 'off' (TOTP turned off meanwhile),
# 'used' (a replayed or older code, a used recovery code) or 'gone' (account removed or disabled).
FINISH = LUA_LOGIN + LUA_CODES + r"""
local now, key, uid = tonumber(ARGV[1]), 'sa:lp:' .. ARGV[2], ARGV[3]
local p = redis.call('HMGET', key, 'u', 'x')
if p[1] ~= uid or now >= tonumber(p[2]) then return 'expired' end
local why, take = code_ok(uid, ARGV[4], ARGV[5])
if why == 'off' then redis.call('DEL', key) end
if why ~= 'ok' then return why end
if not login_session(now, 6) then
  redis.call('DEL', key)
  return 'gone'
end
take_code(uid, ARGV[4], take)
redis.call('DEL', key)
return 'ok'
"""

# Everything a page shows of a user's factors. ARGV: uid.
# Returns {totp since ('' off), recovery codes left, setup pending ('1'/'0'), [ref, name, added, last used,
# backup eligible, backed up]...}.
VIEW = r"""
local uid = ARGV[1]
local out = {redis.call('HGET', 'sa:mfa:' .. uid, 'since') or '', redis.call('SCARD', 'sa:rc:' .. uid),
             redis.call('EXISTS', 'sa:totp:setup:' .. uid)}
for _, ref in ipairs(redis.call('SMEMBERS', 'sa:pks:' .. uid)) do
  local p = redis.call('HMGET', 'sa:pk:' .. ref, 'name', 'a', 'l', 'be', 'bs')
  if p[1] then
    for _, v in ipairs({ref, p[1], p[2], p[3] or '', p[4] or '0', p[5] or '0'}) do out[#out + 1] = v end
  end
end
return out
"""

# An admin removes every factor of a user: TOTP, recovery codes, passkeys, a setup under way.
# ARGV: now, uid, admin's email, ip, ua. Returns 'reset', 'none' (nothing to remove) or false (no user).
RESET = r"""
local now, uid = tonumber(ARGV[1]), ARGV[2]
local email = redis.call('HGET', 'sa:user:' .. uid, 'email')
if not email then return false end
local refs = redis.call('SMEMBERS', 'sa:pks:' .. uid)
if redis.call('EXISTS', 'sa:mfa:' .. uid, 'sa:rc:' .. uid) == 0 and #refs == 0 then
  redis.call('DEL', 'sa:totp:setup:' .. uid)
  return 'none'
end
emit(now, {t = 'mfa_disabled', u = uid, e = email, i = ARGV[4], g = ARGV[5], r = 'admin', c = ARGV[3]})
redis.call('DEL', 'sa:mfa:' .. uid, 'sa:rc:' .. uid, 'sa:pks:' .. uid, 'sa:totp:setup:' .. uid)
for _, ref in ipairs(refs) do redis.call('DEL', 'sa:pk:' .. ref) end
return 'reset'
"""


# Replace the sealed data key, if it is still the one read. ARGV: old sealed, new sealed.
RESEAL = r"""
if redis.call('GET', 'sa:mfa:key') == ARGV[1] then redis.call('SET', 'sa:mfa:key', ARGV[2]) end
return 1
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SecretBox:
    """Seal small secrets: AES-256-GCM under one of several keys (by version), the newest sealing.

    Each sealed value names the version of the key that sealed it, so older values stay readable
    while that version is kept; the context (the user) is authenticated too, so a value copied to
    another user's key does not open.
    """

    def __init__(self, keys_by_version: dict[int, bytes]):
        self.keys = {v: AESGCM(k) for v, k in keys_by_version.items()}
        self.newest = max(self.keys)

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(12)
        return f"{self.newest}.{b64url(nonce + self.keys[self.newest].encrypt(nonce, plaintext, context.encode()))}"

    def open(self, sealed: str, context: str) -> bytes | None:
        """The plaintext, or None when the value is malformed, altered, of another context or of an
        unknown key version."""
        version, _, body = sealed.partition(".")
        try:
            data = unb64url(body)
            return self.keys[int(version)].decrypt(data[:12], data[12:], context.encode())
        except (ValueError, KeyError, InvalidTag):
            return None

    def is_newest(self, sealed: str) -> bool:
        return sealed.partition(".")[0] == str(self.newest)


class DataKeyLost(RuntimeError):
    """The second factors' data key is in Redis but no version of COOKIE_SECRET here opens it."""


@dataclass(frozen=True, slots=True)
class Passkey:
    """A passkey as the pages show it."""

    ref: str
    name: str
    added: int  # ms
    last_used: int | None  # ms
    synced: bool  # backup eligible: a passkey that a password manager or phone platform copies
    backed_up: bool


@dataclass(frozen=True, slots=True)
class Factors:
    """A user's second factors."""

    totp_since: int | None  # ms; None: TOTP off
    recovery_left: int
    setup_pending: bool
    passkeys: tuple[Passkey, ...]

    @property
    def totp(self) -> bool:
        return self.totp_since is not None

    @property
    def count(self) -> int:
        """How many factors besides the password: TOTP (with its codes) counts once, each passkey once."""
        return int(self.totp) + len(self.passkeys)


@dataclass(frozen=True, slots=True)
class Setup:
    """TOTP being set up: the secret as text, its ``otpauth://`` URI and that URI as an SVG QR code."""

    secret: str
    uri: str
    qr_svg: str


@dataclass(frozen=True, slots=True)
class Pending:
    """The pending second step of a login."""

    key: str  # hash of its id: its name in Redis
    uid: str
    email: str
    next_url: str
    deadline: int  # ms
    sealed_secret: str


@dataclass(frozen=True, slots=True)
class PasswordStep:
    """What the right password leads to: a session, or (TOTP on) a pending step."""

    session: tuple[str, str] | None = None  # (session id, ref)
    pending: str | None = None  # the pending step's id, for this browser's cookie only


def render_qr(uri: str) -> str:
    """The URI as an inline SVG QR code (segno; pure Python, a few ms: run it in an executor)."""
    svg = segno.make(uri, error="m").svg_inline(scale=5, border=4, dark="#000", light="#fff", omitsize=True,
                                                 title="QR code of the authenticator key")
    # segno's <title> names it for screen readers once the SVG is an image.
    return svg.replace("<svg ", '<svg role="img" focusable="false" ', 1)


def parse_code(text: str) -> tuple[str, str] | None:
    """A typed code as (kind, normalised code): six digits are a TOTP code, 12 characters of
    Crockford's base32 (any case, spaces and dashes ignored) a recovery code; else None."""
    raw = re.sub(r"[\s-]", "", text[:64])
    if SIX_DIGITS.fullmatch(raw):
        return TOTP, raw
    code = raw.lower().translate(RECOVERY_FIX)
    if len(code) == RECOVERY_LENGTH and all(c in RECOVERY_ALPHABET for c in code):
        return RECOVERY, code
    return None


def new_recovery_code() -> str:
    """``xxxx-xxxx-xxxx``: 60 random bits."""
    code = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_LENGTH))
    return "-".join(code[i:i + 4] for i in range(0, RECOVERY_LENGTH, 4))


def _text(value: bytes | str | int | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class FactorStore:
    """TOTP, recovery codes and the two-step login. Takes Redis, settings, a clock and the session store in."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, clock: Callable[[], float],
                 sessions: SessionStore, count: Callable[[str, int], None] | None = None):
        self.redis = redis
        self.clock = clock
        self.sessions = sessions
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.key_box = SecretBox({v: settings.derived_key(DATA_KEY_LABEL, v) for v in settings.cookie_secret})
        self._box: SecretBox | None = None  # seals TOTP secrets: the data key, once loaded
        self._recovery_key = b""  # keys the recovery codes' HMACs: derived from the data key
        self._loading: asyncio.Lock | None = None
        host = urllib.parse.urlsplit(settings.origin).hostname or ""
        # Authenticator apps list accounts by issuer: with --public-url, which site this one is.
        self.issuer = f"Session Audit ({host})" if settings.public_url and host else "Session Audit"
        self.scripts = keys.Scripts(redis, setup=SETUP, setup_sealed=SETUP_SEALED, enable=ENABLE, disable=DISABLE,
                                    password_login=PASSWORD_LOGIN, pending=PENDING, finish=FINISH, view=VIEW,
                                    reset=RESET, reseal=RESEAL,
                                    acked={"enable", "disable", "password_login", "finish", "reset"})

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- the data key -------------------------------------------------------------------------

    async def data_key(self) -> None:
        """Load the data key (made on first use, SET NX: the first process wins), re-sealing it under the
        newest COOKIE_SECRET when an older one sealed it. Every process calls it at start.

        Raises DataKeyLost when no version of COOKIE_SECRET here opens it (a version was dropped
        before any process with both had started).
        """
        if self._box is not None:
            return
        self._loading = self._loading or asyncio.Lock()
        async with self._loading:
            if self._box is not None:
                return
            sealed = _text(await self.redis.get(keys.MFA_KEY))
            if not sealed:
                fresh = self.key_box.seal(os.urandom(32), keys.MFA_KEY)
                await self.redis.set(keys.MFA_KEY, fresh, nx=True)
                sealed = _text(await self.redis.get(keys.MFA_KEY))
            key = self.key_box.open(sealed, keys.MFA_KEY)
            if key is None:
                raise DataKeyLost(f"no version of COOKIE_SECRET opens {keys.MFA_KEY}: TOTP and recovery codes cannot "
                                  "be checked (was the old version removed before every process had both?)")
            if not self.key_box.is_newest(sealed):  # compare-and-set: a newer process may have re-sealed it
                await self.scripts.reseal(args=[sealed, self.key_box.seal(key, keys.MFA_KEY)])
            self._recovery_key = hmac.new(key, b"recovery codes", hashlib.sha256).digest()
            self._box = SecretBox({1: key})

    @property
    def box(self) -> SecretBox:
        assert self._box is not None, "await data_key() first"
        return self._box

    # -- codes ------------------------------------------------------------------------------

    def totp_step(self, secret: str, code: str) -> int | None:
        """The time step whose TOTP code ``code`` is (now, or one step either side), or None."""
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD)
        now = int(self.clock() // TOTP_PERIOD)
        found = None
        for step in range(now - TOTP_DRIFT, now + TOTP_DRIFT + 1):  # all three: the same time whatever matches
            if hmac.compare_digest(totp.generate_otp(step), code):
                found = step
        return found

    def recovery_hash(self, code: str) -> str:
        """The stored form of a (normalised) recovery code: HMAC-SHA256 under a key from the data key."""
        return hmac.new(self._recovery_key, code.encode(), hashlib.sha256).hexdigest()

    def _code_args(self, uid: str, code: str, sealed: str) -> tuple[str, str] | None:
        """The (kind, value) that the scripts check for a typed code, or None when it cannot be right."""
        parsed = parse_code(code)
        if parsed is None:
            return None
        kind, text = parsed
        if kind == RECOVERY:
            return kind, self.recovery_hash(text)
        secret = self.box.open(sealed, uid) if sealed else None
        step = self.totp_step(secret.decode(), text) if secret else None
        return None if step is None else (kind, str(step))

    # -- setup ------------------------------------------------------------------------------

    async def begin_setup(self, uid: str, email: str) -> Setup | None:
        """A TOTP secret to set up (the one under way, if any), or None when TOTP is already on."""
        await self.data_key()
        now = self.now_ms()
        secret = pyotp.random_base32()  # 160 bits, as RFC 4226 recommends
        sealed = await self.scripts.setup(args=[now, uid, self.box.seal(secret.encode(), uid),
                                                now + SETUP_SECONDS * 1000, (SETUP_SECONDS + 60) * 1000])
        if not sealed:
            return None
        opened = self.box.open(_text(sealed), uid)
        return await self._setup(opened.decode() if opened else secret, email)

    async def current_setup(self, uid: str, email: str) -> Setup | None:
        """The setup under way (to show again after a wrong code), or None."""
        await self.data_key()
        sealed = await self.scripts.setup_sealed(args=[self.now_ms(), uid])
        secret = self.box.open(_text(sealed), uid) if sealed else None
        return await self._setup(secret.decode(), email) if secret else None

    async def _setup(self, secret: str, email: str) -> Setup:
        uri = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD).provisioning_uri(
            name=email, issuer_name=self.issuer)
        svg = await asyncio.get_running_loop().run_in_executor(None, render_qr, uri)
        return Setup(secret=secret, uri=uri, qr_svg=svg)

    async def confirm_setup(self, uid: str, code: str, *, ref: str, ip: str,
                            user_agent: str) -> list[str] | str:
        """Turn TOTP on when ``code`` is right for the secret being set up: the new recovery codes
        (shown once, stored only as HMACs), or why not: 'bad_code', 'expired' or 'on'."""
        await self.data_key()
        sealed = _text(await self.scripts.setup_sealed(args=[self.now_ms(), uid]))
        if not sealed:
            return "expired"
        secret = self.box.open(sealed, uid)
        parsed = parse_code(code)
        step = self.totp_step(secret.decode(), parsed[1]) if secret and parsed and parsed[0] == TOTP else None
        if step is None:
            return "bad_code"
        codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]
        hashes = [self.recovery_hash(c.replace("-", "")) for c in codes]
        result = _text(await self.scripts.enable(args=[self.now_ms(), uid, sealed, step, ref, ip, user_agent,
                                                       *hashes]))
        if result != "ok":
            return result
        self.count(events.MFA_ENABLED, 1)
        return codes

    async def disable(self, uid: str, sealed: str, code: str, *, ref: str, ip: str, user_agent: str) -> str:
        """Turn TOTP off with a code (TOTP or recovery; the caller checked the password):
        'ok', 'bad_code' (wrong, replayed or used) or 'off'."""
        await self.data_key()
        args = self._code_args(uid, code, sealed)
        if args is None:
            return "bad_code"
        result = _text(await self.scripts.disable(args=[self.now_ms(), uid, *args, ref, ip, user_agent]))
        if result == "ok":
            self.count(events.MFA_DISABLED, 1)
        return "bad_code" if result == "used" else result

    # -- two-step login -----------------------------------------------------------------------

    async def password_login(self, uid: str, email_key: str, *, ip: str, user_agent: str, old_ref: str = "",
                             new_hash: str = "", old_hash: str = "", device: str | None = None,
                             next_url: str = "") -> PasswordStep | None:
        """After the right password, in one script: a session (TOTP off) or a pending second step
        (TOTP on). None when the account was removed or disabled meanwhile."""
        session_id, ref, login = self.sessions.login_args(
            uid, email_key, ip=ip, user_agent=user_agent, old_ref=old_ref, new_hash=new_hash, old_hash=old_hash,
            method=events.BY_PASSWORD, device=device)
        token = secrets.token_urlsafe(32)
        now = self.now_ms()
        result = _text(await self.scripts.password_login(args=[
            now, pending_key(token), now + PENDING_SECONDS * 1000, (PENDING_SECONDS + 60) * 1000, next_url, *login]))
        if result == "session":
            self.sessions.count(events.LOGIN, 1)
            return PasswordStep(session=(session_id, ref))
        if result == "pending":
            return PasswordStep(pending=token)
        return None

    async def pending(self, token: str) -> Pending | None:
        """The live pending step named by ``token`` (from this browser's cookie), or None."""
        key = pending_key(token)
        out = await self.scripts.pending(args=[self.now_ms(), key])
        if not out:
            return None
        uid, email, next_url, deadline, sealed = (_text(v) for v in out)
        return Pending(key=key, uid=uid, email=email, next_url=next_url, deadline=int(deadline), sealed_secret=sealed)

    async def finish_login(self, pending: Pending, code: str, *, ip: str, user_agent: str, old_ref: str = "",
                           device: str | None = None) -> tuple[str, tuple[str, str] | None]:
        """Check ``code`` and, when right, consume the step and log in, in one script.

        Returns (outcome, (session id, ref) or None); outcome is 'totp' or 'recovery_code' (how the
        login was proved), 'bad_code' (wrong, or a used recovery code), 'replayed' (the app's code of
        a time step already used: right, but once only), 'expired' (the step is gone or TOTP was
        turned off meanwhile) or 'gone' (the account was disabled meanwhile).
        """
        await self.data_key()
        args = self._code_args(pending.uid, code, pending.sealed_secret)
        if args is None:
            return "bad_code", None
        kind, value = args
        session_id, ref, login = self.sessions.login_args(pending.uid, pending.email, ip=ip, user_agent=user_agent,
                                                          old_ref=old_ref, method=kind, device=device)
        result = _text(await self.scripts.finish(args=[self.now_ms(), pending.key, pending.uid, kind, value, *login]))
        if result == "ok":
            self.sessions.count(events.LOGIN, 1)
            return kind, (session_id, ref)
        if result == "used":
            return ("replayed" if kind == TOTP else "bad_code"), None
        return {"off": "expired"}.get(result, result), None

    # -- views and the admin's reset -------------------------------------------------------

    async def view(self, uid: str) -> Factors:
        out = [_text(v) for v in await self.scripts.view(args=[uid])]
        passkeys = tuple(sorted(
            (Passkey(ref=out[i], name=out[i + 1], added=int(out[i + 2] or 0),
                     last_used=int(out[i + 3]) if out[i + 3] else None, synced=out[i + 4] == "1",
                     backed_up=out[i + 5] == "1") for i in range(3, len(out), 6)),
            key=lambda p: p.added))
        return Factors(totp_since=int(out[0]) if out[0] else None, recovery_left=int(out[1]),
                       setup_pending=out[2] == "1", passkeys=passkeys)

    async def sealed_secret(self, uid: str) -> str:
        """The user's sealed TOTP secret ('' when TOTP is off)."""
        return _text(await self.redis.hget(keys.MFA + uid, "totp"))

    async def reset(self, uid: str, *, actor: str, ip: str, user_agent: str) -> str | None:
        """An admin removes every factor of ``uid``: 'reset', 'none' (there was none) or None (no such user)."""
        result = _text(await self.scripts.reset(args=[self.now_ms(), uid, actor, ip, user_agent]))
        if result == "reset":
            self.count(events.MFA_DISABLED, 1)
        return result or None


def pending_key(token: str) -> str:
    """The name in Redis of a pending step: SHA-256 of its id (the id itself is only in the cookie)."""
    return hashlib.sha256(token.encode()).hexdigest()
