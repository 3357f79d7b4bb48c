"""Failed-login throttling per account and per client address, with bounded exponential backoff.

Each failure counts against the account (by normalised email, whether or not it exists, so the
throttle tells nothing about which emails exist) and against the address, for ``login_window``
seconds. From the threshold on, the next attempt must wait ``base * 2**(failures - threshold)``
seconds after the last failure, at most ``backoff_max``: a guessing loop slows down fast, while
the real user is never shut out for longer than the cap, and a successful login clears the
account's count. Attempts made while throttled are refused (429) without checking the password
and do not extend the wait. The address threshold sits well above the account one: many people
share an address behind NAT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from . import keys
from .config import Settings

# Read the account's user record and both counters. ARGV: now, email, ip, thresholds and backoff.
# Returns {uid, hash, disabled, wait_ms}.
CHECK = r"""
local now, email, ip = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local t_acct, t_addr, base, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function wait(key, threshold)
  local f = redis.call('HMGET', key, 'n', 't')
  local n = tonumber(f[1])
  if not n or n < threshold then return 0 end
  local delay = math.min(base * 2 ^ (n - threshold), cap)
  return math.max(0, tonumber(f[2]) + delay - now)
end
local w = math.max(wait('sa:f:a:' .. email, t_acct), wait('sa:f:i:' .. ip, t_addr))
local uid = redis.call('HGET', 'sa:emails', email)
local user = {false, false}
if uid then user = redis.call('HMGET', 'sa:user:' .. uid, 'hash', 'disabled') end
return {uid or '', user[1] or '', user[2] or '0', string.format('%.0f', w)}
"""

# Record a failed login. ARGV: now, email, ip, ua, reason, t_acct, t_addr, window_ms, uid
# For a real failure (reason bad_credentials) both counters grow; crossing a threshold records
# one locked_out. A throttled attempt only records login_failed/throttled.
FAIL = r"""
local now, email, ip, ua, reason = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local t_acct, t_addr, window = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local uid = ARGV[9]
local akey, ikey = 'sa:f:a:' .. email, 'sa:f:i:' .. ip
local an, inn = 0, 0
if reason == 'bad_credentials' then
  an = (tonumber(redis.call('HGET', akey, 'n')) or 0) + 1
  inn = (tonumber(redis.call('HGET', ikey, 'n')) or 0) + 1
end
emit(now, {t = 'login_failed', u = uid, e = email, i = ip, g = ua, r = reason})
if an == t_acct then emit(now, {t = 'locked_out', u = uid, e = email, i = ip, g = ua, r = 'account'}) end
if inn == t_addr then emit(now, {t = 'locked_out', i = ip, g = ua, r = 'address'}) end
if reason == 'bad_credentials' then
  redis.call('HSET', akey, 'n', an, 't', ARGV[1])
  redis.call('PEXPIRE', akey, window)
  redis.call('HSET', ikey, 'n', inn, 't', ARGV[1])
  redis.call('PEXPIRE', ikey, window)
end
return an
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a login needs before the password is checked."""

    uid: str | None
    password_hash: str | None
    disabled: bool
    retry_after: int  # seconds to wait; 0 when not throttled


class Throttle:
    """Failed-login counters. Takes Redis, settings and a clock in."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, clock: Callable[[], float],
                 count: Callable[[str, int], None] | None = None):
        self.settings = settings
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.clock = clock
        self.scripts = keys.Scripts(redis, check=CHECK, fail=FAIL, acked={"fail"})

    async def check(self, email: str, ip: str) -> Attempt:
        """The account (if any) and how long this login must wait, in one round trip."""
        s = self.settings
        uid, pw_hash, disabled, wait_ms = await self.scripts.check(args=[
            int(self.clock() * 1000), email, ip, s.login_account_threshold, s.login_address_threshold,
            int(s.login_backoff_base * 1000), int(s.login_backoff_max * 1000)])
        return Attempt(uid=uid.decode() or None, password_hash=pw_hash.decode() or None,
                       disabled=disabled == b"1", retry_after=math.ceil(int(wait_ms) / 1000))

    async def fail(self, email: str, ip: str, user_agent: str, reason: str, uid: str | None) -> int:
        """Record a failed attempt (and a lock-out when it crosses a threshold)."""
        s = self.settings
        failures = int(await self.scripts.fail(args=[
            int(self.clock() * 1000), email, ip, user_agent, reason, s.login_account_threshold,
            s.login_address_threshold, s.login_window * 1000, uid or ""]))
        self.count("login_failed", 1)
        if failures == s.login_account_threshold:
            self.count("locked_out", 1)
        return failures
