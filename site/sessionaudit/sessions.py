"""Sessions in Redis: create at login, load-and-refresh in one round trip, end, and expire exactly once.

The cookie carries a random 256-bit session id. Redis never sees it: every key, index entry and
audit event names the session by its *ref*, an HMAC of the id under the session secret, which
cannot be turned back into the id.

A session is a hash ``sa:s:<ref>`` of numbers with a TTL a little past its deadline (a backstop
only), its ref in the deadline index ``sa:deadlines`` (scored by deadline), and a member of its
user's set ``sa:us:<uid>``. Its address and user agent are those of its login event; once the
hash is gone (downtime), the login event also tells the sweeper whose session it was.
Deadlines are enforced by the scripts against the ``now`` they are given, never by the TTL.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from . import events, keys, throttle

# Log in: a Lua function that scripts which finish a login of their own (a second factor, a passkey)
# include and call with the offset of its 14 arguments in ARGV (``SessionStore.login_args``):
#   ref, uid, idle_ms, lifetime_ms, slack_ms, ip, ua, old_ref, new_hash, old_hash, email, method,
#   device (the id of the browser's device cookie for this account, '' none), pair (see TOUCH)
# Returns the user's email, or false (nothing written) when the account is gone or disabled.
# The session hash holds three numbers (u uid, l last seen, x lifetime deadline): its deadline is
# its score in the deadline index, and when, where from and with what it began is its login event.
LUA_LOGIN = r"""
local function login_session(now, at)
  local A = function(i) return ARGV[at + i - 1] end
  local ref, uid = A(1), A(2)
  local idle, lifetime, slack = tonumber(A(3)), tonumber(A(4)), tonumber(A(5))
  local ip, ua, old_ref = A(6), A(7), A(8)
  local user = redis.call('HMGET', 'sa:user:' .. uid, 'email', 'disabled', 'hash')
  if not user[1] or user[2] == '1' then return false end
  local email = user[1]
  local old_uid = old_ref ~= '' and redis.call('HGET', 'sa:s:' .. old_ref, 'u')
  local old_deadline = old_uid and deadline_of(old_ref)
  -- Events first: the browser's previous session ends, then the new one begins.
  if old_uid and old_deadline then
    if now >= old_deadline then
      expire_member(now, old_ref, old_deadline)
    else
      local oemail = redis.call('HGET', 'sa:user:' .. old_uid, 'email') or ''
      emit(now, {t = 'logout', u = old_uid, e = oemail, s = old_ref, i = ip, g = ua})
      drop_session(old_ref, old_uid, old_ref)
    end
  end
  emit(now, {t = 'login', u = uid, e = email, s = ref, i = ip, g = ua, r = A(12)})
  local deadline = math.min(now + idle, now + lifetime)
  local key = 'sa:s:' .. ref
  redis.call('HSET', key, 'u', uid, 'l', string.format('%.0f', now), 'x', string.format('%.0f', now + lifetime))
  if A(14) and A(14) ~= '' then redis.call('HSET', key, 'h', A(14)) end
  redis.call('PEXPIRE', key, deadline - now + slack)
  redis.call('ZADD', 'sa:deadlines', deadline, ref)
  redis.call('SADD', 'sa:us:' .. uid, ref)
  if A(9) ~= '' and user[3] == A(10) then
    redis.call('HSET', 'sa:user:' .. uid, 'hash', A(9))
  end
  -- A success clears the failures it was throttled by: the device's, or else the account's.
  if A(13) ~= '' then redis.call('DEL', 'sa:f:d:' .. A(13)) else redis.call('DEL', 'sa:f:a:' .. A(11)) end
  return email
end
"""

# ARGV: now, then the 14 arguments of login_session. Returns the user's email, or false.
LOGIN = LUA_LOGIN + r"""
return login_session(tonumber(ARGV[1]), 2)
"""

# The hot path: one round trip per authenticated request.
# ARGV: now, ref, idle_ms, slack_ms, with_sessions ('1' or '0'), pair, ip, ua, binding, moves a minute
# `pair` is the address's digest times 2^26 plus the browser's (26 bits each: exact in Lua's numbers).
# A session remembers the pair it last used: a request with another appends one session_changed
# (at most `moves` a minute one by one, the rest summarised) and remembers the new pair, or, when
# `binding` (address or browser) forbids that change, ends the session (revoked, binding).
# Returns false (no such session, or it just ended and was recorded), or
# {uid, email, admin, [ref, created, last, ip, ua, moved]...} (the user's sessions, this one included)
TOUCH = r"""
local now, ref, idle, slack = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local key = 'sa:s:' .. ref
local s = redis.call('HMGET', key, 'u', 'l', 'x', 'h', 'm')
if not s[1] then return false end
local deadline = math.min(tonumber(s[2]) + idle, tonumber(s[3]))
if now >= deadline then
  expire_member(now, ref, deadline)
  return false
end
local uid = s[1]
local user = redis.call('HMGET', 'sa:user:' .. uid, 'email', 'admin', 'disabled')
if not user[1] or user[3] == '1' then return false end
local pair, last_pair = tonumber(ARGV[6]), tonumber(s[4])
if pair and pair ~= last_pair then
  if last_pair then
    local address = math.floor(pair / 67108864) ~= math.floor(last_pair / 67108864)
    local browser = pair % 67108864 ~= last_pair % 67108864
    if (ARGV[9] == 'address' and address) or (ARGV[9] == 'browser' and browser) then
      emit(now, {t = 'revoked', u = uid, e = user[1], s = ref, r = 'binding', i = ARGV[7], g = ARGV[8]})
      drop_session(ref, uid, ref)
      return false
    end
    local reason = address and (browser and 'address,browser' or 'address') or 'browser'
    record_budgeted('mv:' .. ref, now, tonumber(ARGV[10]),
                    {t = 'session_changed', u = uid, e = user[1], s = ref, r = reason, i = ARGV[7], g = ARGV[8]})
    local moved = (tonumber(s[5]) or 0)
    if address and moved % 2 == 0 then moved = moved + 1 end
    if browser and moved < 2 then moved = moved + 2 end
    redis.call('HSET', key, 'h', ARGV[6], 'm', moved)
    redis.call('ZADD', 'sa:st:moved', now, ref)
    redis.call('ZREMRANGEBYSCORE', 'sa:st:moved', '-inf', now - 86400000)
  else
    redis.call('HSET', key, 'h', ARGV[6])  -- a session from before the check: remember, record nothing
  end
end
local new_deadline = math.min(now + idle, tonumber(s[3]))
redis.call('HSET', key, 'l', ARGV[1])
redis.call('PEXPIRE', key, new_deadline - now + slack)
redis.call('ZADD', 'sa:deadlines', new_deadline, ref)
local out = {uid, user[1], user[2]}
if ARGV[5] == '1' then
  for _, other in ipairs(redis.call('SMEMBERS', 'sa:us:' .. uid)) do
    local o = redis.call('HMGET', 'sa:s:' .. other, 'l', 'm')
    local other_deadline = deadline_of(other)
    if o[1] and other_deadline and other_deadline > now then
      local created, ip, ua = login_of(other)
      if other == ref then o[1] = ARGV[1] end
      for _, v in ipairs({other, created, o[1], ip, ua, o[2] or '0'}) do out[#out + 1] = v end
    end
  end
end
return out
"""

# Which of these sessions are live and their user an admin (without refreshing them)?
# ARGV: now, ref... Returns the refs that are.
ADMINS = r"""
local now, out = tonumber(ARGV[1]), {}
for i = 2, #ARGV do
  local ref = ARGV[i]
  local uid = redis.call('HGET', 'sa:s:' .. ref, 'u')
  local deadline = uid and deadline_of(ref)
  if deadline and now < deadline then
    local user = redis.call('HMGET', 'sa:user:' .. uid, 'admin', 'disabled')
    if user[1] == '1' and user[2] ~= '1' then out[#out + 1] = ref end
  end
end
return out
"""

# End one session with an event of type ARGV[3] (logout or revoked).
# ARGV: now, ref, type, reason, actor, ip, ua, owner uid ('' = anyone's)
# Returns 'ended', 'expired' (its deadline had passed: recorded as expired instead) or false.
END = r"""
local now, ref = tonumber(ARGV[1]), ARGV[2]
local uid = redis.call('HGET', 'sa:s:' .. ref, 'u')
local deadline = uid and deadline_of(ref)
if not deadline or (ARGV[8] ~= '' and uid ~= ARGV[8]) then return false end
if now >= deadline then
  expire_member(now, ref, deadline)
  return 'expired'
end
local email = redis.call('HGET', 'sa:user:' .. uid, 'email') or ''
emit(now, {t = ARGV[3], u = uid, e = email, s = ref, r = ARGV[4], c = ARGV[5], i = ARGV[6], g = ARGV[7]})
drop_session(ref, uid, ref)
return 'ended'
"""

# Lua: revoke every live session of a user but ``keep`` (with the reason, actor, address and user agent
# of the request that ends them); one already past its deadline is recorded as expired instead.
# Returns how many were revoked. Included by END_ALL and by the password reset (resets.py).
END_SESSIONS = r"""
local function end_sessions(now, uid, email, reason, actor, ip, ua, keep)
  local ended = 0
  for _, ref in ipairs(redis.call('SMEMBERS', 'sa:us:' .. uid)) do
    if ref ~= keep then
      local deadline = deadline_of(ref)
      if not deadline then
        redis.call('SREM', 'sa:us:' .. uid, ref)
      elseif now >= deadline then
        expire_member(now, ref, deadline)
      else
        emit(now, {t = 'revoked', u = uid, e = email, s = ref, r = reason, c = actor, i = ip, g = ua})
        drop_session(ref, uid, ref)
        ended = ended + 1
      end
    end
  end
  return ended
end
"""

# End every session of a user but one: revoked with a reason. Optionally record first the event that
# caused it (password_changed, with its reason and the session that made the change) and set a user
# field (password hash, disabled flag), in the same script, so the change and the endings are one.
# ARGV: now, uid, reason, actor, ip, ua, keep_ref, field, value, cause type, cause reason, cause session
# Returns the number of sessions ended (expired ones are recorded as expired, not counted).
END_ALL = END_SESSIONS + r"""
local now, uid = tonumber(ARGV[1]), ARGV[2]
local email = redis.call('HGET', 'sa:user:' .. uid, 'email')
if not email then return -1 end
if ARGV[10] ~= '' then
  emit(now, {t = ARGV[10], u = uid, e = email, s = ARGV[12], r = ARGV[11], i = ARGV[5], g = ARGV[6]})
end
local ended = end_sessions(now, uid, email, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
if ARGV[8] ~= '' then redis.call('HSET', 'sa:user:' .. uid, ARGV[8], ARGV[9]) end
return ended
"""

# Live sessions for the admin list. ARGV: uid ('' for everyone's), offset, limit.
# Returns {more, ref, uid, email, created, last, deadline, ip, ua, ...}, latest deadline first
# (everyone's: a page of the deadline index; one user's: all their sessions, sorted by the caller).
LIST = r"""
local uid, offset, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local refs, more = {}, 0
if uid ~= '' then
  refs = redis.call('SMEMBERS', 'sa:us:' .. uid)
else
  refs = redis.call('ZREVRANGE', 'sa:deadlines', offset, offset + limit)
  if #refs > limit then more = 1; refs[#refs] = nil end
end
local out = {more}
local emails = {}
for _, ref in ipairs(refs) do
  local s = redis.call('HMGET', 'sa:s:' .. ref, 'u', 'l')
  local deadline = s[1] and deadline_of(ref)
  if deadline then
    if emails[s[1]] == nil then emails[s[1]] = redis.call('HGET', 'sa:user:' .. s[1], 'email') or '' end
    local created, ip, ua = login_of(ref)
    for _, v in ipairs({ref, s[1], emails[s[1]], created, s[2], string.format('%.0f', deadline), ip, ua}) do
      out[#out + 1] = v
    end
  end
end
return out
"""

# Claim up to ARGV[2] sessions whose deadline is at or before ARGV[1]. Safe with any number of
# processes: the script re-reads the index, so each entry is claimed (and recorded) once.
EXPIRE_DUE = r"""
local now, batch, lifetime = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', 'sa:deadlines', '-inf', now, 'WITHSCORES', 'LIMIT', 0, batch)
local lag = 0
for i = 1, #due, 2 do
  local deadline = tonumber(due[i + 1])
  if now - deadline > lag then lag = now - deadline end
  expire_member(now, due[i], deadline, lifetime)
end
return {#due / 2, lag}
"""


@dataclass(frozen=True, slots=True)
class SessionView:
    """A live session as a page shows it."""

    ref: str
    created: int  # ms
    last_seen: int  # ms
    ip: str
    user_agent: str
    moved: int = 0  # since sign-in: 1 used from another address, 2 another browser, 3 both

    @property
    def moved_address(self) -> bool:
        return bool(self.moved & 1)

    @property
    def moved_browser(self) -> bool:
        return bool(self.moved & 2)


@dataclass(frozen=True, slots=True)
class Current:
    """The session of this request and its user, from one round trip."""

    ref: str
    uid: str
    email: str
    admin: bool
    created: int  # ms; known when the page asked for the sessions, else 0
    sessions: tuple[SessionView, ...] = ()


MOVES_PER_MINUTE = 10  # session_changed events a session records one by one each minute; the rest summarised
_VERSIONS = re.compile(r"\d+(?:[._]\d+)*")


def address_key(ip: str) -> str:
    """What counts as the same address: IPv4 as it is, IPv6 by its /64 network."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def browser_key(user_agent: str) -> str:
    """What counts as the same browser: the user agent with its version numbers taken out."""
    return _VERSIONS.sub("#", user_agent)


@functools.lru_cache(maxsize=4096)
def pair(ip: str, user_agent: str) -> int:
    """Digests of an address and a browser, as one number: address * 2^26 + browser.

    26 bits of a hash each (a change goes unseen once in 67 million; the address itself is in the
    login event anyway, so the digest needs no key). An IPv6 address counts by its /64 network,
    whose host part privacy extensions change every day; a browser by its user agent without
    version numbers, so that an update is not a change of browser. Cached: a session's requests
    repeat the same pair.
    """
    def digest(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest()) >> 6

    return digest(address_key(ip)) * 2**26 + digest(browser_key(user_agent))


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionStore:
    """Create, load, end and expire sessions. Takes Redis, the session secret and a clock in."""

    def __init__(self, redis: aioredis.Redis, secrets: dict[int, bytes], clock: Callable[[], float], *,
                 idle: int, lifetime: int, slack: int = 60, count: Callable[[str, int], None] | None = None,
                 binding: str = "off", moves_per_minute: int = MOVES_PER_MINUTE):
        self.redis = redis
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.secrets = secrets  # the key naming sessions, by the cookie secret version that signed the cookie
        self.newest = max(secrets)
        self.clock = clock
        self.idle_ms = idle * 1000  # seconds → ms
        self.lifetime_ms = lifetime * 1000
        self.slack_ms = slack * 1000
        self.binding = "" if binding == "off" else binding
        self.moves_per_minute = moves_per_minute
        self.scripts = keys.Scripts(redis, login=LOGIN, touch=throttle.LUA + TOUCH, end=END, end_all=END_ALL,
                                    expire_due=EXPIRE_DUE, admins=ADMINS, list=LIST)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def new_id() -> str:
        """A fresh session id: 256 random bits."""
        return secrets.token_urlsafe(32)

    def ref(self, session_id: str, version: int | None = None) -> str:
        """The name of a session everywhere but the cookie: HMAC-SHA256 of the id, 96 bits, 16 characters.

        96 bits keep refs apart among any number of sessions Redis can hold, and name nothing an
        attacker could use: the id itself cannot be recovered from it. ``version`` is that of the
        cookie secret that signed the session's cookie (new sessions: the newest).
        """
        secret = self.secrets.get(self.newest if version is None else version, self.secrets[self.newest])
        digest = hmac.new(secret, session_id.encode(), hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    async def create(self, uid: str, email_key: str, *, ip: str, user_agent: str, old_ref: str = "",
                     new_hash: str = "", old_hash: str = "", method: str = events.BY_PASSWORD,
                     device: str | None = None) -> tuple[str, str] | None:
        """Log in: a new session (its `login` event, whose reason is ``method``: how the user proved
        themselves), ending the browser's previous one.

        Also stores ``new_hash`` when the password was rehashed (only if the stored hash is still
        ``old_hash``) and clears the failed-login counter of the account (or, with ``device``, of
        that device cookie). Returns (session id, ref), or
        None when the account was removed or disabled meanwhile.
        """
        session_id, ref, args = self.login_args(uid, email_key, ip=ip, user_agent=user_agent, old_ref=old_ref,
                                                new_hash=new_hash, old_hash=old_hash, method=method, device=device)
        email = await self.scripts.login(args=[self.now_ms(), *args])
        if not email:
            return None
        self.count("login", 1)
        return session_id, ref

    def login_args(self, uid: str, email_key: str, *, ip: str, user_agent: str, old_ref: str = "",
                   new_hash: str = "", old_hash: str = "", method: str = events.BY_PASSWORD,
                   device: str | None = None) -> tuple[str, str, list[str | int]]:
        """A new session id, its ref, and the 14 ARGV values of ``login_session`` (see LUA_LOGIN), for a
        script that finishes a login of its own."""
        session_id = self.new_id()
        ref = self.ref(session_id)
        return session_id, ref, [ref, uid, self.idle_ms, self.lifetime_ms, self.slack_ms, ip, user_agent, old_ref,
                                 new_hash, old_hash, email_key, method, device or "", self.pair(ip, user_agent)]

    @staticmethod
    def pair(ip: str, user_agent: str) -> int:
        """Digests of a request's address and browser, as one number: address * 2^26 + browser (see ``pair``)."""
        return pair(ip, user_agent)

    async def load(self, ref: str, *, ip: str = "", user_agent: str = "",
                   with_sessions: bool = False) -> Current | None:
        """The session and its user, refreshed (sliding idle deadline); None when it has ended.

        ``ip`` and ``user_agent`` are the request's: a session used from another address or browser
        than it last was records the move (or ends, under ``binding``) in the same round trip.
        """
        out = await self.scripts.touch(args=[self.now_ms(), ref, self.idle_ms, self.slack_ms,
                                             "1" if with_sessions else "0", self.pair(ip, user_agent), ip,
                                             user_agent, self.binding, self.moves_per_minute])
        if not out:
            return None
        values = [_text(v) for v in out]
        listed = tuple(
            SessionView(ref=values[i], created=int(values[i + 1]), last_seen=int(values[i + 2]),
                        ip=values[i + 3], user_agent=values[i + 4], moved=int(values[i + 5]))
            for i in range(3, len(values), 6))
        this = next((s for s in listed if s.ref == ref), None)
        return Current(ref=ref, uid=values[0], email=values[1], admin=values[2] == "1",
                       created=this.created if this else 0,
                       sessions=tuple(sorted(listed, key=lambda s: -s.last_seen)))

    async def live_admins(self, refs: set[str]) -> set[str]:
        """Those of ``refs`` whose session is live and whose user is an enabled admin (not counted as activity)."""
        if not refs:
            return set()
        return {_text(r) for r in await self.scripts.admins(args=[self.now_ms(), *sorted(refs)])}

    async def end(self, ref: str, kind: str = events.LOGOUT, *, reason: str = "", actor: str = "",
                  ip: str = "", user_agent: str = "", owner: str = "") -> str | None:
        """End one session (logout or revoked); 'ended', 'expired' or None if it was not live.

        With ``owner`` set, only a session of that user is ended.
        """
        result = _text(await self.scripts.end(args=[self.now_ms(), ref, kind, reason, actor, ip, user_agent, owner]))
        if result:
            self.count(kind if result == "ended" else events.EXPIRED, 1)
        return result or None

    async def end_all(self, uid: str, reason: str, *, actor: str = "", ip: str = "", user_agent: str = "",
                      keep: str = "", set_field: str = "", set_value: str = "",
                      cause: tuple[str, str] | None = None, session: str = "") -> int:
        """Revoke every session of ``uid`` except ``keep``; optionally set a user field in the same step.

        ``cause`` (type, reason), e.g. (password_changed, user), is recorded first, in the same
        script, naming ``session`` (the session that made the change). Returns how many were
        revoked, or -1 when there is no such user.
        """
        kind, why = cause or ("", "")
        ended = int(await self.scripts.end_all(args=[
            self.now_ms(), uid, reason, actor, ip, user_agent, keep, set_field, set_value, kind, why, session]))
        if ended >= 0 and kind:
            self.count(kind, 1)
        if ended > 0:
            self.count(events.REVOKED, ended)
        return ended

    async def expire_due(self, now_ms: int | None = None, batch: int = 500) -> tuple[int, int]:
        """Record `expired` for sessions whose deadline has passed: (how many, worst lag in ms).

        Each batch reads the clock afresh (unless ``now_ms`` is given), so a long run's later
        batches are stamped when they are really recorded.
        """
        total, worst = 0, 0
        while True:
            now = self.now_ms() if now_ms is None else now_ms
            count, lag = await self.scripts.expire_due(args=[now, batch, self.lifetime_ms])
            total += int(count)
            worst = max(worst, int(lag))
            if int(count) < batch:
                return total, worst

    async def list_live(self, *, uid: str | None = None, offset: int = 0,
                        limit: int = 50) -> tuple[list[LiveSession], bool]:
        """Live sessions, latest deadline (so latest activity) first: (page, whether more follow)."""
        out = [_text(v) for v in await self.scripts.list(args=[uid or "", offset, limit])]
        found = [LiveSession(out[i], out[i + 1], out[i + 2], int(out[i + 3]), int(out[i + 4]), int(out[i + 5]),
                             out[i + 6], out[i + 7]) for i in range(1, len(out), 8)]
        found.sort(key=lambda s: -s.deadline)
        if uid is not None:
            return found[offset:offset + limit], len(found) > offset + limit
        return found, out[0] == "1"

    async def live_count(self) -> int:
        return await self.redis.zcard(keys.DEADLINES)

    async def oldest_deadline(self) -> int | None:
        first = await self.redis.zrange(keys.DEADLINES, 0, 0, withscores=True)
        return int(first[0][1]) if first else None


@dataclass(frozen=True, slots=True)
class LiveSession:
    """A live session as the admin list shows it."""

    ref: str
    uid: str
    email: str
    created: int
    last_seen: int
    deadline: int
    ip: str
    user_agent: str
