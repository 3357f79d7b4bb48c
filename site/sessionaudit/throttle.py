"""Throttling with bounded exponential backoff, for every door an attacker can knock on.

Failures count per key for ``login_window`` seconds: per account (by normalised email, whether or
not it exists, so the throttle tells nothing about which emails exist), per client address, and
per device (see below). From a key's threshold on, the next attempt must wait
``base * 2**(failures - threshold)`` seconds after its last failure, at most ``backoff_max``: a
guessing loop slows down fast, while the real user is never shut out for longer than the cap, and a
successful login clears the account's count. Attempts made while throttled are refused (429)
without checking the password and do not extend the wait. The address threshold sits well above
the account one: many people share an address behind NAT.

**Device cookies** (OWASP, "slow down online guessing with device cookies"): a browser that has
logged in to an account carries a signed cookie naming it. Its failures count against that device,
not the account, and failures made without it do not throttle it: whoever locks an account out by
guessing does not lock out the browsers its owner already uses.

**Refused attempts are counted, not stored one by one.** The first attempt refused in a throttled
stretch is recorded as its own event; the ones after it are counted (with the first and last time
and the number of distinct user agents) and recorded as one summary event carrying ``count`` per
backoff window: by the next refused attempt after the window, or by the sweeper once it is over.
The dashboard's counters still count every attempt as it comes. A flood of refused attempts thus
costs Redis a few hundred bytes per window, not per request.

**Doors.** Logins and second-factor codes share the login keys. Refused registrations count per
address (``register_failed``). Doors whose failures cost the attacker nothing (registration,
password reset requests) also have a global budget of events per minute, past which their events
are summarised the same way, so a flood from ever new addresses cannot fill Redis either.

The Lua functions in ``LUA`` are the mechanism; a store whose script records a door's event (the
reset requests, for one) includes them and calls them in that same script.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from . import events, keys
from .config import Settings
from .inputs import address_key

DEVICE_KEY_LABEL = "sessionaudit device cookie"
SUMMARY_KEEP_MS = 7 * 86_400_000  # a pending summary outlives its window by this much (no server running)

# Throttle state of one key (an account, an address, a device): a hash with n (failures in the
# window) and t (the last failure, ms). While throttled, refused attempts not yet recorded live in
# '<key>:p' (c count, f first ms, l last ms, w when the window ends, and the summary's event: y type,
# u uid, e email, i ip, g user agent, r reason, s session), their user agents in the HyperLogLog '<key>:h', and
# the key in sa:f:due (scored by w) so that the sweeper records the last window of a flood.
LUA = r"""
-- How long the key makes an attempt wait (ms), its backoff window (ms), and its count.
local function throttle_wait(key, threshold, base, cap, now)
  local f = redis.call('HMGET', key, 'n', 't')
  local n = tonumber(f[1])
  if not n or n < threshold then return 0, 0, n or 0 end
  local delay = math.min(base * 2 ^ (n - threshold), cap)
  return math.max(0, tonumber(f[2]) + delay - now), delay, n
end

-- An attempt let through by a key at its threshold takes the key's next window at once, so that
-- attempts arriving together when a wait ends get one try between them, not one each.
local function throttle_claim(key, threshold, base, cap, now)
  local wait, delay, n = throttle_wait(key, threshold, base, cap, now)
  if wait == 0 and n >= threshold then redis.call('HSET', key, 't', string.format('%.0f', now)) end
  return wait, delay
end

-- A failure: one more for the key, for `window` ms. Returns the new count.
-- Keys of a kind (sa:f:<kind>:...) are listed in sa:f:ix:<kind> by their last failure; past
-- 20,000 live keys of a kind, the one whose last failure is oldest goes: a flood of ever new
-- emails or addresses costs bounded memory, and cannot push out a key that is failing now.
local function throttle_fail(key, now, window)
  local n = redis.call('HINCRBY', key, 'n', 1)
  redis.call('HSET', key, 't', string.format('%.0f', now))
  redis.call('PEXPIRE', key, window)
  local index = 'sa:f:ix:' .. string.match(key, '^sa:f:(%w+):')
  redis.call('ZADD', index, now, key)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - window)
  if redis.call('ZCARD', index) > 20000 then
    for _, old in ipairs(redis.call('ZPOPMIN', index)) do
      if string.sub(old, 1, 5) == 'sa:f:' then redis.call('DEL', old) end
    end
  end
  redis.call('PEXPIRE', index, window)
  return n
end

-- Record the summary pending for `key` (if any attempt is counted in it) and close its window.
local function summary_flush(key, now)
  local p = key .. ':p'
  local s = redis.call('HMGET', p, 'c', 'f', 'l', 'y', 'u', 'e', 'i', 'g', 'r', 's')
  local c = tonumber(s[1])
  if c and c > 0 then
    emit(now, {t = s[4], a = s[3], u = s[5], e = s[6], i = s[7], g = s[8], r = s[9], s = s[10],
               n = c, f = s[2], k = redis.call('PFCOUNT', key .. ':h')})
  end
  redis.call('DEL', p, key .. ':h')
  redis.call('ZREM', 'sa:f:due', key)
end

-- Record `ev`, or count it into the summary of the window open for `key`. The first event of a
-- stretch is recorded as it is and opens a window of `window` ms; the ones in the window are
-- counted, and recorded as one summary once it is over (by the next event, or the sweeper).
-- Returns true when `ev` itself was recorded.
local function summarise(key, now, window, ev)
  local p = key .. ':p'
  local s = redis.call('HMGET', p, 'c', 'w')
  local c, w = tonumber(s[1]), tonumber(s[2])
  if w and now >= w then
    summary_flush(key, now)
    w = nil
  end
  if not w then
    emit(now, ev)
    redis.call('HSET', p, 'c', 0, 'w', string.format('%.0f', now + window))
    redis.call('PEXPIRE', p, window + 604800000)
    redis.call('ZADD', 'sa:f:due', now + window, key)
    return true
  end
  count_stats(now, ev.t, ev.i, 1)
  local ua = ev.g or ''
  redis.call('PFADD', key .. ':h', ua == '' and '-' or string.sub(redis.sha1hex(ua), 1, 12))
  redis.call('PEXPIRE', key .. ':h', w - now + 604800000)
  if c == 0 then redis.call('HSET', p, 'f', string.format('%.0f', now)) end
  redis.call('HSET', p, 'c', c + 1, 'l', string.format('%.0f', now), 'y', ev.t, 'u', ev.u or '',
             'e', ev.e or '', 'i', ev.i or '', 'g', ua, 'r', ev.r or '', 's', ev.s or '')
  return false
end

-- A login attempt refused while `by` ('account', 'device' or 'address') throttles it: recorded, or
-- counted into the summary of that key's backoff window (`delay` ms). `addr` is the address as the
-- throttles count it (inputs.address_key). An address's refusal names no account. Returns true
-- when `ev` itself was recorded.
local function refuse_login(now, email, addr, device, by, delay, ev)
  local key = 'sa:f:i:' .. addr
  if by == 'account' then key = 'sa:f:a:' .. email elseif by == 'device' then key = 'sa:f:d:' .. device end
  if by == 'address' then ev.u = nil; ev.e = nil end
  return summarise(key, now, math.max(delay, 1000), ev)
end

-- Record `ev` of a cheap door: one by one up to `budget` a minute (all doors of its kind together)
-- and 30 minutes' budget a day (a flood kept up all day keeps 30 times the budget, not 1,440 times);
-- summarised past either (with the reason `over_reason` when given). The day's budget holds for the
-- events that name no account, so that junk cannot make a real account's events summaries for the
-- rest of the day; for every event when the door is `own`, one session's own (its moves).
local function record_budgeted(door, now, budget, ev, over_reason, own)
  local minute = 'sa:f:b:' .. door .. ':' .. string.format('%.0f', math.floor(now / 60000))
  local used = redis.call('INCR', minute)
  if used == 1 then redis.call('PEXPIRE', minute, 120000) end
  if used <= budget then
    local within_day = true
    if own or not ev.u or ev.u == '' then
      local day = 'sa:f:b:' .. door .. ':d' .. string.format('%.0f', math.floor(now / 86400000))
      local today = redis.call('INCR', day)
      if today == 1 then redis.call('PEXPIRE', day, 172800000) end
      within_day = today <= 30 * budget
    end
    if within_day then
      emit(now, ev)
      return true
    end
  end
  if over_reason then ev.r = over_reason end
  return summarise('sa:f:b:' .. door, now, 60000, ev)
end
"""

# The login door. ARGV: now, email, ip, device ('' none), t_acct, t_addr, base, cap, the address as
# throttles count it (inputs.address_key), and to record a refusal in the same script when
# throttled: '1', the user agent, the event type and reason.
# Returns {uid, hash, disabled, wait_ms, delay_ms, by, recorded} where `by` names the key that
# throttles ('account', 'device', 'address' or '') and `recorded` is '1' when the refusal was recorded
# as an event of its own (not counted into a summary).
CHECK = r"""
local now, email, ip, device = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local t_acct, t_addr, base, cap = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local by, wait, delay = '', 0, 0
local own_key, own_kind = 'sa:f:a:' .. email, 'account'
if device ~= '' then own_key, own_kind = 'sa:f:d:' .. device, 'device' end
local w, d = throttle_claim(own_key, t_acct, base, cap, now)
if w > 0 then by, wait, delay = own_kind, w, d end
local addr = ARGV[9]
w, d = throttle_claim('sa:f:i:' .. addr, t_addr, base, cap, now)
if w > wait then by, wait, delay = 'address', w, d end
local uid = redis.call('HGET', 'sa:emails', email)
local user = {false, false}
if uid then user = redis.call('HMGET', 'sa:user:' .. uid, 'hash', 'disabled') end
local recorded = '0'
if wait > 0 and ARGV[10] == '1' then
  local ev = {t = ARGV[12], u = uid or '', e = email ~= '-' and email or '', i = ip, g = ARGV[11], r = ARGV[13]}
  if refuse_login(now, email, addr, device, by, delay, ev) then recorded = '1' end
end
return {uid or '', user[1] or '', user[2] or '0', string.format('%.0f', wait), string.format('%.0f', delay), by,
        recorded}
"""

# A login refused while throttled. ARGV: now, email, ip, ua, uid, by, delay_ms, type, reason, device,
# the address as throttles count it
REFUSE = r"""
return refuse_login(tonumber(ARGV[1]), ARGV[2], ARGV[11], ARGV[10], ARGV[6], tonumber(ARGV[7]),
                    {t = ARGV[8], u = ARGV[5], e = ARGV[2], i = ARGV[3], g = ARGV[4], r = ARGV[9]}) and 1 or 0
"""

# A failed login (or second-factor code). ARGV: now, email, ip, ua, reason, t_acct, t_addr, window_ms,
# uid, device ('' none), budget, the address as throttles count it. Both the account's (or, with a
# device cookie, the device's) and the address's counts grow; crossing a threshold records one
# locked_out. Failures for ever new emails without an account, from ever new addresses, never reach
# a threshold: past `budget` a minute (all of them together) they are summarised, as a cheap door's
# are. Returns the account's (device's) count.
FAIL = r"""
local now, email, ip, ua, reason = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local t_acct, t_addr, window, uid, device = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10]
local budget, addr = tonumber(ARGV[11]), ARGV[12]
local own_key, own_kind = 'sa:f:a:' .. email, 'account'
if device ~= '' then own_key, own_kind = 'sa:f:d:' .. device, 'device' end
-- A failure against an account is always recorded as itself (the account's own throttle bounds
-- them, and its owner's history must show every guess, however much junk surrounds it). Failures
-- for emails without an account share a budget: past it, their recording is what is throttled,
-- summarised as login_failed/throttled (the one kind of login event that may carry a count).
local ev = {t = 'login_failed', u = uid, e = email, i = ip, g = ua, r = reason}
if uid ~= '' then emit(now, ev) else record_budgeted('login', now, budget, ev, 'throttled') end
local an = throttle_fail(own_key, now, window)
local inn = throttle_fail('sa:f:i:' .. addr, now, window)
if an == t_acct then
  record_budgeted('lockout', now, budget, {t = 'locked_out', u = uid, e = email, i = ip, g = ua, r = own_kind})
end
if inn == t_addr then record_budgeted('lockout', now, budget, {t = 'locked_out', i = ip, g = ua, r = 'address'}) end
return an
"""

# A refused registration. ARGV: now, email (as typed), ip, ua, reason, t_addr, base, cap, window_ms, budget,
# the address as throttles count it
# Throttled addresses are refused (reason throttled, summarised); other refusals count against the
# address. Returns the wait (ms) before this address may try again (0 when not throttled).
REGISTER_FAILED = r"""
local now, email, ip, ua, reason = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local t_addr, base, cap, window = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local key = 'sa:f:r:' .. ARGV[11]
local wait, delay = throttle_wait(key, t_addr, base, cap, now)
local ev = {t = 'register_failed', e = email, i = ip, g = ua, r = reason}
if wait > 0 then
  ev.r = 'throttled'
  summarise(key, now, delay, ev)
  return string.format('%.0f', wait)
end
record_budgeted('register', now, tonumber(ARGV[10]), ev)
local n = throttle_fail(key, now, window)
if n >= t_addr then
  wait = throttle_wait(key, t_addr, base, cap, now)
end
return string.format('%.0f', wait)
"""

# Is this address throttled for registrations? ARGV: now, the address as throttles count it, t_addr,
# base, cap. Returns the wait (ms).
REGISTER_WAIT = r"""
local wait = throttle_wait('sa:f:r:' .. ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
                           tonumber(ARGV[1]))
return string.format('%.0f', wait)
"""

# Record the summaries whose window is over (the sweeper). ARGV: now, batch. Returns how many.
FLUSH_DUE = r"""
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', 'sa:f:due', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, key in ipairs(due) do summary_flush(key, now) end
return #due
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a login needs before the password is checked."""

    uid: str | None
    password_hash: str | None
    disabled: bool
    retry_after: int  # seconds to wait; 0 when not throttled
    delay_ms: int = 0  # the throttling key's backoff window
    by: str = ""  # which key throttles: account, device, address


class Throttle:
    """Failure counters and summaries for every door. Takes Redis, settings and a clock in."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, clock: Callable[[], float],
                 count: Callable[[str, int], None] | None = None):
        self.settings = settings
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.clock = clock
        # By cookie secret version, newest first: a rotation of COOKIE_SECRET keeps known devices known.
        self.device_secrets = [settings.derived_key(DEVICE_KEY_LABEL, v) for v in sorted(settings.cookie_secret,
                                                                                         reverse=True)]
        self.scripts = keys.Scripts(redis, check=LUA + CHECK, refuse=LUA + REFUSE, fail=LUA + FAIL,
                                    register_failed=LUA + REGISTER_FAILED, register_wait=LUA + REGISTER_WAIT,
                                    flush_due=LUA + FLUSH_DUE,
                                    acked={"check", "refuse", "fail", "register_failed", "flush_due"})

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _backoff(self) -> list[int]:
        s = self.settings
        return [int(s.login_backoff_base * 1000), int(s.login_backoff_max * 1000)]

    # -- logins (and second-factor codes) -------------------------------------------------

    async def check(self, email: str, ip: str, device: str | None = None, *,
                    refuse_as: str | None = None) -> Attempt:
        """The account (if any) and how long this login must wait, in one round trip.

        With ``device`` (the id of a device cookie naming this account) the device's failures
        count instead of the account's. With ``refuse_as`` (the request's user agent) an attempt
        that must wait is recorded as refused in the same script (see ``refuse``): a flood of
        refused attempts costs one round trip each.
        """
        s = self.settings
        record = ["1", refuse_as, events.LOGIN_FAILED, events.THROTTLED] if refuse_as is not None else ["0"]
        uid, pw_hash, disabled, wait_ms, delay_ms, by, recorded = await self.scripts.check(args=[
            self._now(), email, ip, device or "", s.login_account_threshold, s.login_address_threshold,
            *self._backoff(), address_key(ip), *record])
        if recorded == b"1":
            self.count(events.LOGIN_FAILED, 1)
        return Attempt(uid=uid.decode() or None, password_hash=pw_hash.decode() or None,
                       disabled=disabled == b"1", retry_after=math.ceil(int(wait_ms) / 1000),
                       delay_ms=int(delay_ms), by=by.decode())

    async def refuse(self, email: str, ip: str, user_agent: str, attempt: Attempt, device: str | None = None,
                     kind: str = events.LOGIN_FAILED, reason: str = events.THROTTLED) -> None:
        """Record an attempt refused while throttled: its own event, or a count in the window's summary."""
        recorded = await self.scripts.refuse(args=[
            self._now(), email, ip, user_agent, attempt.uid or "", attempt.by, max(attempt.delay_ms, 1000),
            kind, reason, device or "", address_key(ip)])
        if recorded:
            self.count(kind, 1)

    async def fail(self, email: str, ip: str, user_agent: str, reason: str, uid: str | None,
                   device: str | None = None) -> int:
        """Record a failed attempt (and a lock-out when it crosses a threshold)."""
        s = self.settings
        failures = int(await self.scripts.fail(args=[
            self._now(), email, ip, user_agent, reason, s.login_account_threshold,
            s.login_address_threshold, s.login_window * 1000, uid or "", device or "", s.door_budget,
            address_key(ip)]))
        self.count("login_failed", 1)
        if failures == s.login_account_threshold:
            self.count("locked_out", 1)
        return failures

    # -- registrations -----------------------------------------------------------------

    async def register_wait(self, ip: str) -> int:
        """Seconds this address must wait before it may register (0: not throttled)."""
        s = self.settings
        wait = await self.scripts.register_wait(args=[self._now(), address_key(ip), s.login_address_threshold,
                                                      *self._backoff()])
        return math.ceil(int(wait) / 1000)

    async def register_failed(self, email: str, ip: str, user_agent: str, reason: str) -> int:
        """Record a refused registration (reason taken, invalid or weak_password; throttled when the
        address is throttled). Returns the seconds the address must now wait (0: none)."""
        s = self.settings
        wait = await self.scripts.register_failed(args=[
            self._now(), email[:254], ip, user_agent, reason, s.login_address_threshold, *self._backoff(),
            s.login_window * 1000, s.door_budget, address_key(ip)])
        self.count(events.REGISTER_FAILED, 1)
        return math.ceil(int(wait) / 1000)

    # -- background ---------------------------------------------------------------------

    async def flush_due(self, now_ms: int | None = None, batch: int = 200) -> int:
        """Record the summaries of refused attempts whose window is over; how many were recorded."""
        return int(await self.scripts.flush_due(args=[self._now() if now_ms is None else now_ms, batch]))

    # -- device cookies -------------------------------------------------------------------

    def device_cookie(self, email: str) -> str:
        """A new device cookie value naming ``email``'s account: ``<account tag>.<device id>``.

        The tag is a keyed hash of the email, so the cookie does not show whose account it names.
        """
        return f"{self._tag(email, self.device_secrets[0])}.{secrets.token_urlsafe(16)}"

    def device_for(self, cookie: str | None, email: str) -> str | None:
        """The device id in a (verified) device cookie value when it names ``email``'s account, else None."""
        if not cookie or not email:
            return None
        tag, _, device = cookie.partition(".")
        if len(device) != 22:
            return None
        if not any(hmac.compare_digest(tag, self._tag(email, secret)) for secret in self.device_secrets):
            return None
        return device

    @staticmethod
    def _tag(email: str, secret: bytes) -> str:
        digest = hmac.new(secret, email.encode(), hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(digest).decode()
