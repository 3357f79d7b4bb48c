"""Passkeys (WebAuthn, with py_webauthn): registration, usernameless sign-in, rename and removal.

Every passkey is discoverable (resident key required) and every ceremony requires user verification,
so a passkey alone proves two factors and its sign-in asks no second one. The relying party is the
host of ``--public-url`` and the expected origin that URL.

Challenges are single use and short lived without costing Redis anything until they are used:
each carries its purpose (a registration bound to the session asking, or a sign-in), its expiry
by the site's clock and an HMAC under a key derived from COOKIE_SECRET; the script that accepts a
response marks its challenge used (``sa:wc:<nonce>``, until the challenge would have expired
anyway), so an anonymous flood of option requests writes nothing, and a response is accepted once.

A passkey is a hash ``sa:pk:<ref>`` (ref: 22 characters of SHA-256 of the credential id) with its
user, COSE public key, sign count, backup flags, name, when added and last used; ``sa:pks:<uid>``
lists a user's refs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.authentication.verify_authentication_response import VerifiedAuthentication
from webauthn.helpers import (
    parse_authentication_credential_json,
    parse_client_data_json,
    parse_registration_credential_json,
)
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticationCredential,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from . import events, keys
from .config import Settings
from .factors import b64url, unb64url
from .sessions import LUA_LOGIN, SessionStore

log = logging.getLogger("sessionaudit.passkeys")

RP_NAME = "Session Audit"
TIMEOUT_MS = 120_000  # what the browser gives the person to use their authenticator
CHALLENGE_MS = 180_000  # a challenge is accepted this long after it was issued (the timeout and some slack)
MAX_PASSKEYS = 20  # per account
NAME_MAX = 64  # characters of a passkey's name
CHALLENGE_KEY_LABEL = "sessionaudit webauthn challenge"
HANDLE_KEY_LABEL = "sessionaudit webauthn user handle"
CREATE, GET = "create", "get"  # the two purposes of a challenge
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
TRANSPORTS = {t.value for t in AuthenticatorTransport}

# A user's credential ids and transports (to exclude at registration). ARGV: uid. Returns {id, t, ...}.
CREDENTIALS = r"""
local out = {}
for _, ref in ipairs(redis.call('SMEMBERS', 'sa:pks:' .. ARGV[1])) do
  local p = redis.call('HMGET', 'sa:pk:' .. ref, 'id', 't')
  if p[1] then out[#out + 1] = p[1]; out[#out + 1] = p[2] or '' end
end
return out
"""

# Add a passkey. ARGV: now, uid, ref, challenge nonce, its ttl_ms, max, session ref, ip, ua, then the
# record's field/value pairs. Returns 'ok', 'used' (challenge), 'exists', 'full' or 'gone' (no user).
ADD = r"""
local now, uid, ref = tonumber(ARGV[1]), ARGV[2], ARGV[3]
if redis.call('EXISTS', 'sa:wc:' .. ARGV[4]) == 1 then return 'used' end
if redis.call('EXISTS', 'sa:pk:' .. ref) == 1 then return 'exists' end
if redis.call('SCARD', 'sa:pks:' .. uid) >= tonumber(ARGV[6]) then return 'full' end
local email = redis.call('HGET', 'sa:user:' .. uid, 'email')
if not email then return 'gone' end
emit(now, {t = 'passkey_added', u = uid, e = email, s = ARGV[7], i = ARGV[8], g = ARGV[9]})
local record = {'HSET', 'sa:pk:' .. ref, 'u', uid, 'a', ARGV[1]}
for i = 10, #ARGV do record[#record + 1] = ARGV[i] end
redis.call(unpack(record))
redis.call('SADD', 'sa:pks:' .. uid, ref)
redis.call('SET', 'sa:wc:' .. ARGV[4], '1', 'PX', tonumber(ARGV[5]))
return 'ok'
"""

# What a sign-in needs of a passkey. ARGV: ref. Returns {uid, email, COSE key, sign count, user handle} or false.
STORED = r"""
local p = redis.call('HMGET', 'sa:pk:' .. ARGV[1], 'u', 'k', 'n', 'h')
if not p[1] then return false end
return {p[1], redis.call('HGET', 'sa:user:' .. p[1], 'email') or '', p[2], p[3] or '0', p[4] or ''}
"""

# Sign in with a verified assertion. ARGV: now, ref, uid, challenge nonce, its ttl_ms, new sign count,
# backed up ('1'/'0'), then the 14 arguments of login_session (from 8).
# Returns 'ok', 'gone' (passkey removed meanwhile), 'used' (challenge), 'count' (the sign count did
# not grow: a cloned authenticator, or a replay) or 'disabled' (account gone or disabled).
LOGIN = LUA_LOGIN + r"""
local now, ref, uid = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local p = redis.call('HMGET', 'sa:pk:' .. ref, 'u', 'n')
if p[1] ~= uid then return 'gone' end
if redis.call('EXISTS', 'sa:wc:' .. ARGV[4]) == 1 then return 'used' end
local stored, new = tonumber(p[2]) or 0, tonumber(ARGV[6])
if (new > 0 or stored > 0) and new <= stored then return 'count' end
if not login_session(now, 8) then return 'disabled' end
redis.call('HSET', 'sa:pk:' .. ref, 'n', ARGV[6], 'l', ARGV[1], 'bs', ARGV[7])
redis.call('SET', 'sa:wc:' .. ARGV[4], '1', 'PX', tonumber(ARGV[5]))
return 'ok'
"""

# Rename one of a user's passkeys. ARGV: uid, ref, name. Returns 1, or false when it is not theirs.
RENAME = r"""
if redis.call('HGET', 'sa:pk:' .. ARGV[2], 'u') ~= ARGV[1] then return false end
redis.call('HSET', 'sa:pk:' .. ARGV[2], 'name', ARGV[3])
return 1
"""

# Remove one of a user's passkeys. ARGV: now, uid, ref, re-authenticated ('1'/'0'), session ref, ip, ua
# Returns 'ok', 'last' (the account's last factor: needs re-authentication) or false (not theirs).
REMOVE = r"""
local now, uid, ref = tonumber(ARGV[1]), ARGV[2], ARGV[3]
if redis.call('HGET', 'sa:pk:' .. ref, 'u') ~= uid then return false end
local last = redis.call('HEXISTS', 'sa:mfa:' .. uid, 'totp') == 0 and redis.call('SCARD', 'sa:pks:' .. uid) <= 1
if last and ARGV[4] ~= '1' then return 'last' end
local email = redis.call('HGET', 'sa:user:' .. uid, 'email') or ''
emit(now, {t = 'passkey_removed', u = uid, e = email, s = ARGV[5], i = ARGV[6], g = ARGV[7]})
redis.call('DEL', 'sa:pk:' .. ref)
redis.call('SREM', 'sa:pks:' .. uid, ref)
return 'ok'
"""


@dataclass(frozen=True, slots=True)
class Assertion:
    """A sign-in response whose challenge is ours, unused so far and not expired."""

    credential: AuthenticationCredential
    challenge: bytes
    nonce: str
    expires: int  # ms
    ref: str  # of the passkey it claims to be


@dataclass(frozen=True, slots=True)
class StoredPasskey:
    ref: str
    uid: str
    email: str
    public_key: bytes  # COSE
    sign_count: int
    handle: bytes  # the user handle it was registered with


def passkey_ref(credential_id: bytes) -> str:
    """A passkey's name in Redis and in URLs: 22 characters (132 bits) of SHA-256 of its credential id."""
    return b64url(hashlib.sha256(credential_id).digest())[:22]


def clean_name(name: str) -> str:
    """A passkey's name as typed: control characters dropped, spaces collapsed, at most NAME_MAX characters."""
    return " ".join(CONTROL.sub("", name).split())[:NAME_MAX]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def expected_origin(url: str) -> str:
    """The origin a browser reports for ``url``: lower-case scheme and host, no default port."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme.lower()}://{host}{port}"


class PasskeyStore:
    """WebAuthn ceremonies and the passkeys they leave. Takes Redis, settings, a clock and the session store in."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, clock: Callable[[], float],
                 sessions: SessionStore, count: Callable[[str, int], None] | None = None):
        self.redis = redis
        self.clock = clock
        self.sessions = sessions
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.rp_id = urllib.parse.urlsplit(settings.origin).hostname or ""
        self.origin = expected_origin(settings.origin)
        # Browsers refuse an IP address as relying party: passkeys need a host name (localhost will do).
        try:
            ipaddress.ip_address(self.rp_id)
            self.available = False
        except ValueError:
            self.available = bool(self.rp_id)
        self.challenge_keys = {v: settings.derived_key(CHALLENGE_KEY_LABEL, v) for v in settings.cookie_secret}
        self.newest = max(self.challenge_keys)
        self.handle_key = settings.derived_key(HANDLE_KEY_LABEL)
        self.verify_seconds = 0.0  # the last assertion's verification time (bench, logs)
        self.scripts = keys.Scripts(redis, credentials=CREDENTIALS, add=ADD, stored=STORED, login=LOGIN,
                                    rename=RENAME, remove=REMOVE)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- challenges -----------------------------------------------------------------------------

    def challenge(self, purpose: str) -> bytes:
        """A new challenge: 16 random bytes, its expiry (ms, 8 bytes), an HMAC of both and the purpose (16)."""
        body = os.urandom(16) + struct.pack(">Q", self.now_ms() + CHALLENGE_MS)
        return body + self._tag(self.challenge_keys[self.newest], purpose, body)

    def check_challenge(self, challenge: bytes, purpose: str) -> tuple[str, int] | None:
        """(nonce, expiry ms) of a challenge we issued for ``purpose`` that has not expired, else None.
        Whether it was used already is for the script that accepts the response."""
        if len(challenge) != 40:
            return None
        body, tag = challenge[:24], challenge[24:]
        if not any(hmac.compare_digest(tag, self._tag(k, purpose, body)) for k in self.challenge_keys.values()):
            return None
        expires = struct.unpack(">Q", body[16:])[0]
        if self.now_ms() >= expires:
            return None
        return b64url(body[:16]), expires

    @staticmethod
    def _tag(key: bytes, purpose: str, body: bytes) -> bytes:
        return hmac.new(key, purpose.encode() + b"\0" + body, hashlib.sha256).digest()[:16]

    def _used_ttl(self, expires: int) -> int:
        """How long a used challenge must be remembered: until it would have expired anyway."""
        return max(expires - self.now_ms(), 0) + 60_000

    def user_handle(self, uid: str) -> bytes:
        """The WebAuthn user id of an account: 16 bytes of an HMAC of its id (names nothing outside the site)."""
        return hmac.new(self.handle_key, uid.encode(), hashlib.sha256).digest()[:16]

    # -- registration ---------------------------------------------------------------------------

    async def registration_options(self, uid: str, email: str, session_ref: str) -> str | None:
        """The options for ``navigator.credentials.create`` as JSON, or None when the account has
        MAX_PASSKEYS already. The challenge is bound to this session."""
        out = [_text(v) for v in await self.scripts.credentials(args=[uid])]
        if len(out) // 2 >= MAX_PASSKEYS:
            return None
        exclude = [PublicKeyCredentialDescriptor(
            id=unb64url(out[i]),
            transports=[AuthenticatorTransport(t) for t in out[i + 1].split(",") if t in TRANSPORTS])
            for i in range(0, len(out), 2)]
        options = generate_registration_options(
            rp_id=self.rp_id, rp_name=RP_NAME, user_name=email, user_id=self.user_handle(uid), user_display_name=email,
            challenge=self.challenge(f"{CREATE}:{session_ref}"), timeout=TIMEOUT_MS,
            attestation=AttestationConveyancePreference.NONE,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED, user_verification=UserVerificationRequirement.REQUIRED),
            exclude_credentials=exclude)
        return options_to_json(options)

    async def add(self, uid: str, session_ref: str, credential: str, name: str, *, ip: str,
                  user_agent: str) -> str:
        """Verify a registration response and keep the passkey (its `passkey_added` event in the same
        script): 'ok', or why not: 'invalid', 'expired', 'used', 'exists', 'full' or 'gone'."""
        try:  # a library parsing bytes from anywhere: whatever it raises means a response we cannot use
            parsed = parse_registration_credential_json(credential)
            challenge = parse_client_data_json(parsed.response.client_data_json).challenge
        except Exception:
            return "invalid"
        checked = self.check_challenge(challenge, f"{CREATE}:{session_ref}")
        if checked is None:
            return "expired"
        nonce, expires = checked
        try:
            verified = verify_registration_response(
                credential=parsed, expected_challenge=challenge, expected_rp_id=self.rp_id,
                expected_origin=self.origin, require_user_verification=True)
        except Exception as e:
            log.info("passkey registration refused: %s", e)
            return "invalid"
        transports = ",".join(t.value for t in parsed.response.transports or () if t.value in TRANSPORTS)
        record = {
            "id": b64url(verified.credential_id), "k": b64url(verified.credential_public_key),
            "n": str(verified.sign_count), "h": b64url(self.user_handle(uid)), "name": clean_name(name) or "Passkey",
            "be": "1" if verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE else "0",
            "bs": "1" if verified.credential_backed_up else "0", "t": transports, "ag": verified.aaguid,
        }
        fields = [x for pair in record.items() for x in pair]
        result = _text(await self.scripts.add(args=[
            self.now_ms(), uid, passkey_ref(verified.credential_id), nonce, self._used_ttl(expires), MAX_PASSKEYS,
            session_ref, ip, user_agent, *fields]))
        if result == "ok":
            self.count(events.PASSKEY_ADDED, 1)
        return result

    async def rename(self, uid: str, ref: str, name: str) -> bool:
        return bool(await self.scripts.rename(args=[uid, ref, clean_name(name) or "Passkey"]))

    async def remove(self, uid: str, ref: str, *, reauthenticated: bool, session_ref: str, ip: str,
                     user_agent: str) -> str | None:
        """Remove a passkey (its `passkey_removed` event in the same script): 'ok', 'last' (the account's
        last factor, and no re-authentication) or None (no such passkey of this user)."""
        result = _text(await self.scripts.remove(args=[self.now_ms(), uid, ref, "1" if reauthenticated else "0",
                                                       session_ref, ip, user_agent]))
        if result == "ok":
            self.count(events.PASSKEY_REMOVED, 1)
        return result or None

    # -- sign-in ----------------------------------------------------------------------------------

    def authentication_options(self) -> str:
        """The options for ``navigator.credentials.get`` as JSON: any passkey of this site (usernameless).
        Costs no Redis: the challenge carries its own expiry and HMAC."""
        options = generate_authentication_options(rp_id=self.rp_id, challenge=self.challenge(GET), timeout=TIMEOUT_MS,
                                                  user_verification=UserVerificationRequirement.REQUIRED)
        return options_to_json(options)

    def parse_assertion(self, credential: str) -> Assertion | None:
        """A sign-in response whose challenge we issued and that has not expired, else None."""
        try:
            parsed = parse_authentication_credential_json(credential)
            challenge = parse_client_data_json(parsed.response.client_data_json).challenge
        except Exception:  # see add()
            return None
        checked = self.check_challenge(challenge, GET)
        if checked is None:
            return None
        return Assertion(credential=parsed, challenge=challenge, nonce=checked[0], expires=checked[1],
                         ref=passkey_ref(parsed.raw_id))

    async def stored(self, ref: str) -> StoredPasskey | None:
        out = await self.scripts.stored(args=[ref])
        if not out:
            return None
        uid, email, key, count, handle = (_text(v) for v in out)
        return StoredPasskey(ref=ref, uid=uid, email=email, public_key=unb64url(key), sign_count=int(count),
                             handle=unb64url(handle))

    def verify(self, assertion: Assertion, stored: StoredPasskey) -> VerifiedAuthentication | None:
        """Check the assertion's signature, user verification, relying party, origin and user handle.

        About 0.1 ms of CPU for an ES256 key (bench/mfa.py measures it): done on the IOLoop, an executor
        would cost more than it saves.
        """
        started = time.perf_counter()
        try:
            handle = assertion.credential.response.user_handle
            if handle is None or not hmac.compare_digest(handle, stored.handle):
                return None
            return verify_authentication_response(
                credential=assertion.credential, expected_challenge=assertion.challenge, expected_rp_id=self.rp_id,
                expected_origin=self.origin, credential_public_key=stored.public_key,
                credential_current_sign_count=stored.sign_count, require_user_verification=True)
        except Exception as e:  # see add()
            log.info("passkey sign-in refused: %s", e)
            return None
        finally:
            self.verify_seconds = time.perf_counter() - started

    async def finish_login(self, assertion: Assertion, stored: StoredPasskey, verified: VerifiedAuthentication, *,
                           ip: str, user_agent: str, old_ref: str = "",
                           device: str | None = None) -> tuple[str, tuple[str, str] | None]:
        """Log in with a verified assertion, marking its challenge used and keeping the sign count, in one
        script: ('ok', (session id, ref)), or why not: 'gone', 'used', 'count' or 'disabled'."""
        session_id, ref, login = self.sessions.login_args(stored.uid, stored.email, ip=ip, user_agent=user_agent,
                                                          old_ref=old_ref, method=events.BY_PASSKEY, device=device)
        result = _text(await self.scripts.login(args=[
            self.now_ms(), stored.ref, stored.uid, assertion.nonce, self._used_ttl(assertion.expires),
            verified.new_sign_count, "1" if verified.credential_backed_up else "0", *login]))
        if result == "ok":
            self.sessions.count(events.LOGIN, 1)
            return result, (session_id, ref)
        return result, None

