"""Sessions in Redis: create at login, load-and-refresh in one round trip, end, and expire exactly once.

The cookie carries a random 256-bit session id. Redis never sees it: every key, index entry and
audit event names the session by its *ref*, an HMAC of the id under the session secret, which
cannot be turned back into the id.

A session is one short string ``sa:ss:<ref>`` (its user, the digest of the address and browser it
last used, how it moved, when and from where it began: see ``session_of`` in keys.py) with a TTL a
little past its lifetime (a backstop only), its ref in the deadline index ``sa:deadlines``
(scored by deadline, which also tells when it was last used), and a field of its user's hash
``sa:ui:<uid>``. A page that lists a user's sessions reads them all with one MGET: what it shows is
in the strings, not in their login events. Once a string is gone (long downtime), the login event
tells the sweeper whose session it was. Deadlines are enforced by the scripts against the ``now``
they are given, never by the TTL.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from . import events, keys, throttle
from .inputs import address_key

# Log in: a Lua function that scripts which finish a login of their own (a second factor, a passkey)
# include and call with the offset of its 14 arguments in ARGV (``SessionStore.login_args``):
#   ref, uid, idle_ms, lifetime_ms, slack_ms, ip, ua, old_ref, new_hash, old_hash, email, method,
#   device (the id of the browser's device cookie for this account, '' none), pair (see TOUCH)
# Returns the user's email, or false (nothing written) when the account is gone or disabled.
LUA_LOGIN = r"""
local function login_session(now, at)
  local A = function(i) return ARGV[at + i - 1] end
  local ref, uid = A(1), A(2)
  local idle, lifetime, slack = tonumber(A(3)), tonumber(A(4)), tonumber(A(5))
  local ip, ua, old_ref = A(6), A(7), A(8)
  local user = redis.call('HMGET', 'sa:user:' .. uid, 'email', 'disabled', 'hash')
  if not user[1] or user[2] == '1' then return false end
  local email = user[1]
  -- Run twice (a client retrying after a lost reply): the first run did it all, once.
  if redis.call('HEXISTS', 'sa:sessev', ref) == 1 then return email end
  local old = old_ref ~= '' and session_of(old_ref)
  local old_deadline = old and deadline_of(old_ref)
  -- Events first: the browser's previous session ends, then the new one begins.
  if old_deadline then
    if now >= old_deadline then
      expire_member(now, old_ref, old_deadline, lifetime)
    else
      local oemail = redis.call('HGET', 'sa:user:' .. old.uid, 'email') or ''
      emit(now, {t = 'logout', u = old.uid, e = oemail, s = old_ref, i = ip, g = ua})
      drop_session(old_ref, old.uid)
    end
  end
  local ev = {t = 'login', u = uid, e = email, s = ref, i = ip, g = ua, r = A(12)}
  local id = emit(now, ev)  -- ev.g is now the agent's key in its day's dictionary
  local session = {uid = uid, pair = (A(14) and A(14) ~= '') and A(14) or '-', moved = 0,
                   login = tonumber(string.match(id, '^(%d+)')), ip = ip, agent = ev.g}
  local lifetime_dl = session.login + lifetime
  local deadline = math.min(now + idle, lifetime_dl)
  if deadline >= lifetime_dl then session.last = now end
  redis.call('SET', 'sa:ss:' .. ref, session_string(session), 'PX', string.format('%.0f', lifetime_dl - now + slack))
  redis.call('ZADD', 'sa:deadlines', deadline, ref)
  redis.call('HSET', 'sa:ui:' .. uid, ref, '')
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
# ARGV: now, ref, idle_ms, lifetime_ms, with_sessions ('1' or '0'), pair, ip, ua, binding, moves a minute
# `pair` is the address's digest times 2^26 plus the browser's (26 bits each: exact in Lua's numbers),
# in base 36. A session remembers the pair it last used: a request with another appends one
# session_changed (at most `moves` a minute one by one, the rest summarised) and remembers the new
# pair, or, when `binding` (address or browser) forbids that change, ends the session (revoked,
# binding). Writes one ZADD (the sliding deadline), and the string only when something in it changed.
# Returns false (no such session, or it just ended and was recorded), or
# {uid, email, admin, [ref, created, last, ip, ua, moved]...} (the user's sessions, this one included)
TOUCH = r"""
local now, ref, idle, lifetime = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local s = session_of(ref)
local deadline = s and deadline_of(ref)
if not deadline then return false end
if now >= deadline then
  expire_member(now, ref, deadline, lifetime)
  return false
end
local uid = s.uid
local user = redis.call('HMGET', 'sa:user:' .. uid, 'email', 'admin', 'disabled')
if not user[1] or user[3] == '1' then return false end
local changed = false
if ARGV[6] ~= '' and ARGV[6] ~= s.pair then
  if s.pair ~= '-' then  -- '-': a session from before the check: remember the pair, record nothing
    local pair, last_pair = tonumber(ARGV[6], 36), tonumber(s.pair, 36)
    local address = math.floor(pair / 67108864) ~= math.floor(last_pair / 67108864)
    local browser = pair % 67108864 ~= last_pair % 67108864
    if (ARGV[9] == 'address' and address) or (ARGV[9] == 'browser' and browser) then
      emit(now, {t = 'revoked', u = uid, e = user[1], s = ref, r = 'binding', i = ARGV[7], g = ARGV[8]})
      drop_session(ref, uid)
      return false
    end
    local reason = address and (browser and 'address,browser' or 'address') or 'browser'
    record_budgeted('mv:' .. ref, now, tonumber(ARGV[10]),
                    {t = 'session_changed', u = uid, e = user[1], s = ref, r = reason, i = ARGV[7], g = ARGV[8]},
                    nil, true)
    if address and s.moved % 2 == 0 then s.moved = s.moved + 1 end
    if browser and s.moved < 2 then s.moved = s.moved + 2 end
    redis.call('ZADD', 'sa:st:moved', now, ref)
    redis.call('ZREMRANGEBYSCORE', 'sa:st:moved', '-inf', now - 86400000)
  end
  s.pair = ARGV[6]
  changed = true
end
local lifetime_dl = s.login + lifetime
local new_deadline = math.min(now + idle, lifetime_dl)
if new_deadline >= lifetime_dl then s.last = now; changed = true end  -- the index no longer tells
if changed then redis.call('SET', 'sa:ss:' .. ref, session_string(s), 'KEEPTTL') end
redis.call('ZADD', 'sa:deadlines', new_deadline, ref)
local out = {uid, user[1], user[2]}
if ARGV[5] == '1' then
  -- The agent this request sent is most often the one the session began with: no dictionary read.
  if ARGV[8] ~= '' then agent_cache.known = {string.sub(redis.sha1hex(ARGV[8]), 1, 12), ARGV[8]} end
  local function list(other, o, d)
    local last = other == ref and now or (o.last or (d - idle))
    local at = string.format('%.0f', o.login)
    for _, v in ipairs({other, at, string.format('%.0f', last), o.ip, agent(o.agent, at), o.moved}) do
      out[#out + 1] = v
    end
  end
  list(ref, s, new_deadline)
  local others = redis.call('HKEYS', 'sa:ui:' .. uid)
  for first = 1, #others, 500 do
    local chunk, names = {}, {}
    for i = first, math.min(first + 499, #others) do
      if others[i] ~= ref then chunk[#chunk + 1] = others[i]; names[#names + 1] = 'sa:ss:' .. others[i] end
    end
    if #chunk > 0 then
      local raws = redis.call('MGET', unpack(names))
      local scores = redis.call('ZMSCORE', 'sa:deadlines', unpack(chunk))
      for i, other in ipairs(chunk) do
        local o = raws[i] and parse_session(raws[i])
        local d = tonumber(scores[i])
        if o and d and d > now then list(other, o, d) end
      end
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
  local s = session_of(ref)
  local deadline = s and deadline_of(ref)
  if deadline and now < deadline then
    local user = redis.call('HMGET', 'sa:user:' .. s.uid, 'admin', 'disabled')
    if user[1] == '1' and user[2] ~= '1' then out[#out + 1] = ref end
  end
end
return out
"""

# End one session with an event of type ARGV[3] (logout or revoked).
# ARGV: now, ref, type, reason, actor, ip, ua, owner uid ('' = anyone's), lifetime_ms
# Returns 'ended', 'expired' (its deadline had passed: recorded as expired instead) or false.
END = r"""
local now, ref = tonumber(ARGV[1]), ARGV[2]
local s = session_of(ref)
local deadline = s and deadline_of(ref)
if not deadline or (ARGV[8] ~= '' and s.uid ~= ARGV[8]) then return false end
if now >= deadline then
  expire_member(now, ref, deadline, tonumber(ARGV[9]))
  return 'expired'
end
local email = redis.call('HGET', 'sa:user:' .. s.uid, 'email') or ''
emit(now, {t = ARGV[3], u = s.uid, e = email, s = ref, r = ARGV[4], c = ARGV[5], i = ARGV[6], g = ARGV[7]})
drop_session(ref, s.uid)
return 'ended'
"""

# Lua: revoke every live session of a user but ``keep`` (with the reason, actor, address and user agent
# of the request that ends them); one already past its deadline is recorded as expired instead
# (idle, or lifetime: ``lifetime`` ms after it began). Returns how many were revoked. Included by
# END_ALL and by the password reset (resets.py).
END_SESSIONS = r"""
local function end_sessions(now, uid, email, reason, actor, ip, ua, keep, lifetime)
  local ended = 0
  for _, ref in ipairs(redis.call('HKEYS', 'sa:ui:' .. uid)) do
    if ref ~= keep then
      local deadline = deadline_of(ref)
      if not deadline then
        redis.call('HDEL', 'sa:ui:' .. uid, ref)
      elseif now >= deadline then
        expire_member(now, ref, deadline, lifetime)
      else
        emit(now, {t = 'revoked', u = uid, e = email, s = ref, r = reason, c = actor, i = ip, g = ua})
        drop_session(ref, uid)
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
# ARGV: now, uid, reason, actor, ip, ua, keep_ref, field, value, cause type, cause reason, cause session,
#       lifetime_ms
# Returns the number of sessions ended (expired ones are recorded as expired, not counted).
END_ALL = END_SESSIONS + r"""
local now, uid = tonumber(ARGV[1]), ARGV[2]
local email = redis.call('HGET', 'sa:user:' .. uid, 'email')
if not email then return -1 end
if ARGV[10] ~= '' then
  emit(now, {t = ARGV[10], u = uid, e = email, s = ARGV[12], r = ARGV[11], i = ARGV[5], g = ARGV[6]})
end
local ended = end_sessions(now, uid, email, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[13]))
if ARGV[8] ~= '' then redis.call('HSET', 'sa:user:' .. uid, ARGV[8], ARGV[9]) end
return ended
"""

# Live sessions for the admin list. ARGV: uid ('' for everyone's), offset, limit, idle_ms.
# Returns {more, ref, uid, email, created, last, deadline, ip, ua, ...}, latest deadline first
# (everyone's: a page of the deadline index; one user's: all their sessions, sorted by the caller).
LIST = r"""
local uid, offset, limit, idle = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local refs, more = {}, 0
if uid ~= '' then
  refs = redis.call('HKEYS', 'sa:ui:' .. uid)
else
  refs = redis.call('ZREVRANGE', 'sa:deadlines', offset, offset + limit)
  if #refs > limit then more = 1; refs[#refs] = nil end
end
local out = {more}
local emails = {}
for _, ref in ipairs(refs) do
  local s = session_of(ref)
  local deadline = s and deadline_of(ref)
  if deadline then
    if emails[s.uid] == nil then emails[s.uid] = redis.call('HGET', 'sa:user:' .. s.uid, 'email') or '' end
    local at = string.format('%.0f', s.login)
    for _, v in ipairs({ref, s.uid, emails[s.uid], at, string.format('%.0f', s.last or (deadline - idle)),
                        string.format('%.0f', deadline), s.ip, agent(s.agent, at)}) do
      out[#out + 1] = v
    end
  end
end
return out
"""

# Sessions as earlier versions kept them (a hash sa:s:<ref>, the user's set sa:us:<uid>) become the
# string and hash of now, a batch at a time, at start: nobody is logged out by an upgrade.
# ARGV: now, lifetime_ms, slack_ms, offset in the deadline index, batch. Returns {converted, next offset}
# (next offset 0 once the index has been read through).
MIGRATE = r"""
local now, lifetime, slack = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local offset, batch = tonumber(ARGV[4]), tonumber(ARGV[5])
local refs = redis.call('ZRANGE', 'sa:deadlines', offset, offset + batch - 1)
local converted = 0
for _, ref in ipairs(refs) do
  local old = 'sa:s:' .. ref
  if redis.call('TYPE', old)['ok'] == 'hash' then
    local h = redis.call('HMGET', old, 'u', 'h', 'm', 'l', 'x')
    local ids = redis.call('HGET', 'sa:sessev', ref)
    local login = ids and string.match(ids, '^(%S+)')
    local found = login and redis.call('XRANGE', 'audit:log', login, login) or {}
    local ip, agent_key = '', ''
    if #found == 1 then
      local f = found[1][2]
      for i = 1, #f, 2 do
        if f[i] == 'i' then ip = f[i + 1] elseif f[i] == 'g' then agent_key = f[i + 1] end
      end
    end
    local began = login and tonumber(string.match(login, '^(%d+)')) or (tonumber(h[5]) - lifetime)
    if h[1] then
      local s = {uid = h[1], pair = h[2] and base36(tonumber(h[2])) or '-', moved = tonumber(h[3]) or 0,
                 login = began, ip = ip, agent = agent_key}
      local deadline = deadline_of(ref)
      if deadline and deadline >= began + lifetime then s.last = tonumber(h[4]) end
      redis.call('SET', 'sa:ss:' .. ref, session_string(s), 'PX', math.max(began + lifetime + slack - now, slack))
      redis.call('HSET', 'sa:ui:' .. h[1], ref, '')
      redis.call('SREM', 'sa:us:' .. h[1], ref)
      converted = converted + 1
    end
    redis.call('DEL', old)
  end
end
if #refs < batch then return {converted, 0} end
return {converted, offset + batch}
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


def browser_key(user_agent: str) -> str:
    """What counts as the same browser: the user agent with its version numbers taken out."""
    return _VERSIONS.sub("#", user_agent)


@functools.lru_cache(maxsize=4096)
def pair(ip: str, user_agent: str) -> str:
    """Digests of an address and a browser, as one number: address * 2^26 + browser, in base 36.

    26 bits of a hash each (a change goes unseen once in 67 million; the address itself is in the
    login event anyway, so the digest needs no key). An IPv6 address counts by its /64 network,
    whose host part privacy extensions change every day; a browser by its user agent without
    version numbers, so that an update is not a change of browser. Cached: a session's requests
    repeat the same pair.
    """
    def digest(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest()) >> 6

    return base36(digest(address_key(ip)) * 2**26 + digest(browser_key(user_agent)))


def base36(n: int) -> str:
    """``n`` in base 36 (as the scripts' ``base36`` writes it, and Lua's ``tonumber(text, 36)`` reads it)."""
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + out
        if n == 0:
            return out


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
        self.scripts = keys.Scripts(redis, login=LOGIN, touch=(throttle.LUA, TOUCH), end=END, end_all=END_ALL,
                                    expire_due=EXPIRE_DUE, admins=ADMINS, list=LIST, migrate=MIGRATE,
                                    acked={"login", "end", "end_all", "expire_due"},
                                    batched={"touch"}, functions={"touch"})

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
    def pair(ip: str, user_agent: str) -> str:
        """Digests of a request's address and browser, as one number in base 36 (see ``pair``)."""
        return pair(ip, user_agent)

    async def load(self, ref: str, *, ip: str = "", user_agent: str = "",
                   with_sessions: bool = False) -> Current | None:
        """The session and its user, refreshed (sliding idle deadline); None when it has ended.

        ``ip`` and ``user_agent`` are the request's: a session used from another address or browser
        than it last was records the move (or ends, under ``binding``) in the same round trip.
        """
        out = await self.scripts.touch(args=[self.now_ms(), ref, self.idle_ms, self.lifetime_ms,
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
        result = _text(await self.scripts.end(args=[self.now_ms(), ref, kind, reason, actor, ip, user_agent, owner,
                                                    self.lifetime_ms]))
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
            self.now_ms(), uid, reason, actor, ip, user_agent, keep, set_field, set_value, kind, why, session,
            self.lifetime_ms]))
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
        out = [_text(v) for v in await self.scripts.list(args=[uid or "", offset, limit, self.idle_ms])]
        found = [LiveSession(out[i], out[i + 1], out[i + 2], int(out[i + 3]), int(out[i + 4]), int(out[i + 5]),
                             out[i + 6], out[i + 7]) for i in range(1, len(out), 8)]
        found.sort(key=lambda s: -s.deadline)
        if uid is not None:
            return found[offset:offset + limit], len(found) > offset + limit
        return found, out[0] == "1"

    async def migrate(self, batch: int = 500) -> int:
        """Convert sessions kept the way earlier versions kept them; how many were converted (start-up)."""
        total, offset = 0, 0
        while True:
            converted, offset = await self.scripts.migrate(args=[self.now_ms(), self.lifetime_ms, self.slack_ms,
                                                                 offset, batch])
            total += int(converted)
            if not int(offset):
                return total

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
