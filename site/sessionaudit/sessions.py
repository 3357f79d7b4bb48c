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
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from . import events, keys

# ARGV: now, ref, uid, idle_ms, lifetime_ms, slack_ms, ip, ua, old_ref, new_hash, old_hash, email
# Returns the user's email, or false when the account is gone or disabled.
# The session hash holds three numbers (u uid, l last seen, x lifetime deadline): its deadline is
# its score in the deadline index, and when, where from and with what it began is its login event.
LOGIN = r"""
local now, ref, uid = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local idle, lifetime, slack = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ip, ua, old_ref = ARGV[7], ARGV[8], ARGV[9]
local user = redis.call('HMGET', 'sa:user:' .. uid, 'email', 'disabled', 'hash')
if not user[1] or user[2] == '1' then return false end
local email = user[1]
-- Run twice (a client retrying after a lost reply): the first run did it all, once.
if redis.call('HEXISTS', 'sa:sessev', ref) == 1 then return email end
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
emit(now, {t = 'login', u = uid, e = email, s = ref, i = ip, g = ua})
local deadline = math.min(now + idle, now + lifetime)
local key = 'sa:s:' .. ref
redis.call('HSET', key, 'u', uid, 'l', ARGV[1], 'x', string.format('%.0f', now + lifetime))
redis.call('PEXPIRE', key, deadline - now + slack)
redis.call('ZADD', 'sa:deadlines', deadline, ref)
redis.call('SADD', 'sa:us:' .. uid, ref)
if ARGV[10] ~= '' and user[3] == ARGV[11] then
  redis.call('HSET', 'sa:user:' .. uid, 'hash', ARGV[10])
end
redis.call('DEL', 'sa:f:a:' .. ARGV[12])
return email
"""

# The hot path: one round trip per authenticated request.
# ARGV: now, ref, idle_ms, slack_ms, with_sessions ('1' or '0')
# Returns false (no such session, or it just expired and was recorded), or
# {uid, email, admin, [ref, created, last, ip, ua]...} (the user's sessions, this one included)
TOUCH = r"""
local now, ref, idle, slack = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local key = 'sa:s:' .. ref
local s = redis.call('HMGET', key, 'u', 'l', 'x')
if not s[1] then return false end
local deadline = math.min(tonumber(s[2]) + idle, tonumber(s[3]))
if now >= deadline then
  expire_member(now, ref, deadline)
  return false
end
local uid = s[1]
local user = redis.call('HMGET', 'sa:user:' .. uid, 'email', 'admin', 'disabled')
if not user[1] or user[3] == '1' then return false end
local new_deadline = math.min(now + idle, tonumber(s[3]))
redis.call('HSET', key, 'l', ARGV[1])
redis.call('PEXPIRE', key, new_deadline - now + slack)
redis.call('ZADD', 'sa:deadlines', new_deadline, ref)
local out = {uid, user[1], user[2]}
if ARGV[5] == '1' then
  for _, other in ipairs(redis.call('SMEMBERS', 'sa:us:' .. uid)) do
    local last = redis.call('HGET', 'sa:s:' .. other, 'l')
    local other_deadline = deadline_of(other)
    if last and other_deadline and other_deadline > now then
      local created, ip, ua = login_of(other)
      out[#out + 1] = other; out[#out + 1] = created; out[#out + 1] = last
      out[#out + 1] = ip; out[#out + 1] = ua
    end
  end
end
return out
"""

# Is a session still live (without refreshing it)? ARGV: now, ref. Returns {uid, admin} or false.
CHECK = r"""
local uid = redis.call('HGET', 'sa:s:' .. ARGV[2], 'u')
local deadline = uid and deadline_of(ARGV[2])
if not deadline or tonumber(ARGV[1]) >= deadline then return false end
local user = redis.call('HMGET', 'sa:user:' .. uid, 'admin', 'disabled')
if user[2] == '1' then return false end
return {uid, user[1] or '0'}
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

# End every session of a user but one: revoked with a reason. Optionally also set a user field
# (password hash, disabled flag) in the same script, so the change and the endings are one.
# ARGV: now, uid, reason, actor, ip, ua, keep_ref, field, value
# Returns the number of sessions ended (expired ones are recorded as expired, not counted).
END_ALL = r"""
local now, uid = tonumber(ARGV[1]), ARGV[2]
local email = redis.call('HGET', 'sa:user:' .. uid, 'email')
if not email then return -1 end
local ended = 0
for _, ref in ipairs(redis.call('SMEMBERS', 'sa:us:' .. uid)) do
  if ref ~= ARGV[7] then
    local deadline = deadline_of(ref)
    if not deadline then
      redis.call('SREM', 'sa:us:' .. uid, ref)
    elseif now >= deadline then
      expire_member(now, ref, deadline)
    else
      emit(now, {t = 'revoked', u = uid, e = email, s = ref, r = ARGV[3], c = ARGV[4], i = ARGV[5], g = ARGV[6]})
      drop_session(ref, uid, ref)
      ended = ended + 1
    end
  end
end
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


@dataclass(frozen=True, slots=True)
class Current:
    """The session of this request and its user, from one round trip."""

    ref: str
    uid: str
    email: str
    admin: bool
    created: int  # ms; known when the page asked for the sessions, else 0
    sessions: tuple[SessionView, ...] = ()


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionStore:
    """Create, load, end and expire sessions. Takes Redis, the session secret and a clock in."""

    def __init__(self, redis: aioredis.Redis, secret: bytes, clock: Callable[[], float], *,
                 idle: int, lifetime: int, slack: int = 60, count: Callable[[str, int], None] | None = None):
        self.redis = redis
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.secret = secret
        self.clock = clock
        self.idle_ms = idle * 1000  # seconds → ms
        self.lifetime_ms = lifetime * 1000
        self.slack_ms = slack * 1000
        self.scripts = keys.Scripts(redis, login=LOGIN, touch=TOUCH, end=END, end_all=END_ALL,
                                    expire_due=EXPIRE_DUE, check=CHECK, list=LIST,
                                    acked={"login", "end", "end_all", "expire_due"})

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def new_id() -> str:
        """A fresh session id: 256 random bits."""
        return secrets.token_urlsafe(32)

    def ref(self, session_id: str) -> str:
        """The name of a session everywhere but the cookie: HMAC-SHA256 of the id, 96 bits, 16 characters.

        96 bits keep refs apart among any number of sessions Redis can hold, and name nothing an
        attacker could use: the id itself cannot be recovered from it.
        """
        digest = hmac.new(self.secret, session_id.encode(), hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    async def create(self, uid: str, email_key: str, *, ip: str, user_agent: str, old_ref: str = "",
                     new_hash: str = "", old_hash: str = "") -> tuple[str, str] | None:
        """Log in: a new session (its `login` event), ending the browser's previous one.

        Also stores ``new_hash`` when the password was rehashed (only if the stored hash is still
        ``old_hash``) and clears the account's failed-login counter. Returns (session id, ref), or
        None when the account was removed or disabled meanwhile.
        """
        session_id = self.new_id()
        ref = self.ref(session_id)
        email = await self.scripts.login(args=[
            self.now_ms(), ref, uid, self.idle_ms, self.lifetime_ms, self.slack_ms, ip, user_agent,
            old_ref, new_hash, old_hash, email_key])
        if not email:
            return None
        self.count("login", 1)
        return session_id, ref

    async def load(self, ref: str, *, with_sessions: bool = False) -> Current | None:
        """The session and its user, refreshed (sliding idle deadline); None when it has ended."""
        out = await self.scripts.touch(args=[self.now_ms(), ref, self.idle_ms, self.slack_ms,
                                             "1" if with_sessions else "0"])
        if not out:
            return None
        values = [_text(v) for v in out]
        listed = tuple(
            SessionView(ref=values[i], created=int(values[i + 1]), last_seen=int(values[i + 2]),
                        ip=values[i + 3], user_agent=values[i + 4])
            for i in range(3, len(values), 5))
        this = next((s for s in listed if s.ref == ref), None)
        return Current(ref=ref, uid=values[0], email=values[1], admin=values[2] == "1",
                       created=this.created if this else 0,
                       sessions=tuple(sorted(listed, key=lambda s: -s.last_seen)))

    async def still_admin(self, ref: str) -> bool:
        """Whether the session is live and its user an admin, without counting as activity."""
        out = await self.scripts.check(args=[self.now_ms(), ref])
        return bool(out) and out[1] == b"1"

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
                      keep: str = "", set_field: str = "", set_value: str = "") -> int:
        """Revoke every session of ``uid`` except ``keep``; optionally set a user field in the same step.

        Returns how many were revoked, or -1 when there is no such user.
        """
        ended = int(await self.scripts.end_all(args=[
            self.now_ms(), uid, reason, actor, ip, user_agent, keep, set_field, set_value]))
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
