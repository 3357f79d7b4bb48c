"""Password resets: one-time tokens mailed as links, their requests and their use, each with its event.

A token is 256 random bits. Redis keeps only its SHA-256 (``sa:rt:<hash>``: the account and the
deadline) and, per account, the hash of the newest one (``sa:ru:<uid>``): asking again deletes the
older token, so only the newest link works; using it deletes both, so it works once; it works
until its deadline (30 minutes), checked against the site's clock, with the Redis TTL a backstop.
A plain hash suffices: the token is random, so there is nothing to guess from its hash.

A request does the same work whether or not the account exists (the same script, the same round
trip; the mail goes through a queue), so neither its answer nor its time tells which emails have
an account. Requests are throttled per email and per address with the login mechanism
(throttle.py) and recorded under the cheap-door budget, so a flood of requests costs a bounded
number of events a minute. Every request is recorded (``password_reset_requested``, naming the
typed email also when no account has it: the trail shows reset probing), in the same script as
its counters and its token.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from . import events, keys, throttle
from .config import Settings
from .inputs import address_key
from .sessions import END_SESSIONS

TOKEN_TTL = 30 * 60  # seconds a reset link works
TOKEN_SLACK_MS = 60_000  # the Redis TTL outlives the deadline by this much (a backstop only)
TOKEN_FORM = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
RESET_PATH = "/password/reset/"

# A reset request. ARGV: now, email, ip, ua, token hash, ttl_ms, slack_ms, t_acct, t_addr, base, cap,
# window_ms, budget, actor, throttled ('1': apply the throttle and the budget; '0': an admin or the
# command line), the address as throttles count it (inputs.address_key).
# Returns {result, wait_ms}: result 'sent' (a token was stored for an enabled
# account), 'none' (no such account, or disabled) or 'throttled'.
REQUEST = r"""
local now, email, ip, ua, digest = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, slack = tonumber(ARGV[6]), tonumber(ARGV[7])
local uid = redis.call('HGET', 'sa:emails', email)
local ev = {t = 'password_reset_requested', u = uid or nil, e = email, i = ip, g = ua, c = ARGV[14]}
if ARGV[15] == '1' then
  local t_acct, t_addr, base, cap = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
  local akey, ikey = 'sa:f:pa:' .. email, 'sa:f:pi:' .. ARGV[16]
  local by, wait, delay = nil, 0, 0
  local w, d = throttle_wait(akey, t_acct, base, cap, now)
  if w > 0 then by, wait, delay = akey, w, d end
  w, d = throttle_wait(ikey, t_addr, base, cap, now)
  if w > wait then by, wait, delay = ikey, w, d end
  if by then
    ev.r = 'throttled'
    summarise(by, now, math.max(delay, 1000), ev)
    return {'throttled', string.format('%.0f', wait)}
  end
  record_budgeted('reset', now, tonumber(ARGV[13]), ev)
  throttle_fail(akey, now, tonumber(ARGV[12]))
  throttle_fail(ikey, now, tonumber(ARGV[12]))
else
  emit(now, ev)
end
if not uid or redis.call('HGET', 'sa:user:' .. uid, 'disabled') == '1' then return {'none', '0'} end
local newest = 'sa:ru:' .. uid
local old = redis.call('GET', newest)
if old then redis.call('DEL', 'sa:rt:' .. old) end
redis.call('HSET', 'sa:rt:' .. digest, 'u', uid, 'x', string.format('%.0f', now + ttl))
redis.call('PEXPIRE', 'sa:rt:' .. digest, ttl + slack)
redis.call('SET', newest, digest, 'PX', ttl + slack)
return {'sent', '0'}
"""

# The account of a token that still works, or false. Shared by CHECK and USE.
ACCOUNT_OF = r"""
local function token_account(now, digest)
  local t = redis.call('HMGET', 'sa:rt:' .. digest, 'u', 'x')
  if not t[1] or now >= tonumber(t[2]) or redis.call('GET', 'sa:ru:' .. t[1]) ~= digest then return false end
  local user = redis.call('HMGET', 'sa:user:' .. t[1], 'email', 'disabled')
  if not user[1] or user[2] == '1' then return false end
  return t[1], user[1]
end
"""

# Does a token work? ARGV: now, token hash. Returns the account's email, or false. Changes nothing.
CHECK = ACCOUNT_OF + r"""
local uid, email = token_account(tonumber(ARGV[1]), ARGV[2])
return uid and email or false
"""

# Use a token: the new password hash, every session ended, the token gone, in one script.
# ARGV: now, token hash, new password hash, ip, ua, session lifetime (ms). Returns {uid, email, sessions
# ended} or false.
USE = ACCOUNT_OF + END_SESSIONS + r"""
local now, digest, ip, ua = tonumber(ARGV[1]), ARGV[2], ARGV[4], ARGV[5]
local uid, email = token_account(now, digest)
if not uid then return false end
emit(now, {t = 'password_changed', u = uid, e = email, i = ip, g = ua, r = 'reset'})
local ended = end_sessions(now, uid, email, 'password_reset', '', ip, ua, '', tonumber(ARGV[6]))
redis.call('HSET', 'sa:user:' .. uid, 'hash', ARGV[3])
redis.call('DEL', 'sa:rt:' .. digest, 'sa:ru:' .. uid)
-- Whoever holds the mailbox now knows the password: failed guesses by others no longer hold it back.
redis.call('DEL', 'sa:f:a:' .. email)
return {uid, email, ended}
"""


def new_token() -> str:
    """A reset token: 256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What Redis stores of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def well_formed(token: str) -> bool:
    return TOKEN_FORM.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class Requested:
    """What a reset request led to."""

    token: str | None  # the link's token when the account exists and is enabled: mail it
    retry_after: int = 0  # seconds, when the request was refused as throttled


class ResetStore:
    """Request, check and use reset tokens. Takes Redis, settings and a clock in."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, clock: Callable[[], float],
                 count: Callable[[str, int], None] | None = None, ttl: int = TOKEN_TTL):
        self.settings = settings
        self.clock = clock
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.ttl_ms = ttl * 1000
        self.scripts = keys.Scripts(redis, request=throttle.LUA + REQUEST, check=CHECK, use=USE,
                                    acked={"request", "use"})

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def link(self, token: str) -> str:
        """The link to mail: on the configured public origin, never on a request's Host."""
        return self.settings.origin + RESET_PATH + token

    async def request(self, email: str, *, ip: str, user_agent: str, actor: str = "",
                      throttled: bool = True) -> Requested:
        """Record a reset request for ``email`` (normalised) and, for an enabled account, store a new token.

        One round trip, the same for every email: a token is made whether or not it is kept.
        ``actor``: the admin who sent it. ``throttled=False`` (an admin, the command line) skips
        the throttle and the budget; the request is still recorded.
        """
        s = self.settings
        token = new_token()
        result, wait = await self.scripts.request(args=[
            self._now(), email, ip, user_agent, digest(token), self.ttl_ms, TOKEN_SLACK_MS,
            s.login_account_threshold, s.login_address_threshold, int(s.login_backoff_base * 1000),
            int(s.login_backoff_max * 1000), s.login_window * 1000, s.door_budget, actor,
            "1" if throttled else "0", address_key(ip)])
        if result == b"throttled":
            return Requested(token=None, retry_after=max(1, math.ceil(int(wait) / 1000)))
        self.count(events.PASSWORD_RESET_REQUESTED, 1)
        return Requested(token=token if result == b"sent" else None)

    async def check(self, token: str) -> str | None:
        """The email of the account whose newest, unused, unexpired token this is; else None."""
        if not well_formed(token):
            return None
        email = await self.scripts.check(args=[self._now(), digest(token)])
        return email.decode() if email else None

    async def use(self, token: str, password_hash: str, *, ip: str, user_agent: str) -> str | None:
        """Set the new password and end every session of the account; the token stops working.

        Returns the account's uid, or None when the token does not work (any more).
        """
        if not well_formed(token):
            return None
        out = await self.scripts.use(args=[self._now(), digest(token), password_hash, ip, user_agent,
                                           self.settings.session_lifetime * 1000])
        if not out:
            return None
        self.count(events.PASSWORD_CHANGED, 1)
        if int(out[2]):
            self.count(events.REVOKED, int(out[2]))
        return out[0].decode()
