"""Redis key names, and the Lua prelude with which every state-changing script writes its event.

State lives under ``sa:``; the audit trail and its indexes under ``audit:``, so a Redis ACL can
give the site's user append-only access to the trail (see docs/redis-acl.md).

Scripts take no KEYS: they build key names from these prefixes, which lets one script touch
state and audit keys under two ACL selectors. Every script takes ``now`` (ms) as an argument,
never ``redis.call('TIME')``, so tests drive the clock. Redis does not roll back a script that
fails half-way, so each script checks first, appends its event(s) next (the write most likely to
fail, on a full or mis-typed stream), and only then changes state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from . import redisconn

AUDIT = "audit:log"  # the stream: source of truth
AUDIT_USER = "audit:u:"  # + uid: stream of ids of that user's events, field t = type
AUDIT_TYPE = "audit:t:"  # + type: stream of ids of events of that type
AGENTS = "audit:ua"  # hash: 12 hex digits of SHA-1 -> user agent; events store the digits (written once)
SESSION_EVENTS = "sa:sessev"  # hash: session ref -> space-separated event ids
LAST_ID = "sa:audit:lastid"  # the last id appended; ids follow the site's clock
EPOCH = "sa:audit:epoch"  # replication id of the primary that appended the last id
USER = "sa:user:"  # + uid: hash id, email, hash, admin, created, disabled
USER_NEXT = "sa:user:next"
EMAILS = "sa:emails"  # hash: normalized email -> uid
SESSION = "sa:s:"  # + ref: hash u (uid), l (last seen), x (lifetime deadline); the deadline is its index score
DEADLINES = "sa:deadlines"  # zset: session refs scored by deadline (ms)
USER_SESSIONS = "sa:us:"  # + uid: set of live session refs
STATS_HOUR = "sa:st:h:"  # + hour number: hash type -> count
STATS_DAY = "sa:st:d:"  # + day number: hash type -> count
FAIL_IPS = "sa:st:fip:"  # + hour number: zset ip -> failures
FAIL_MINUTE = "sa:st:fm:"  # + minute number: failed logins in that minute
FAIL_ACCOUNT = "sa:f:a:"  # + email: hash n (failures), t (last failure ms)
FAIL_ADDRESS = "sa:f:i:"  # + ip

# Lua shared by every writing script. ``emit(now, fields)`` appends one event, its index
# entries and its counters, and returns its id. Field order is fixed and missing values are
# written empty: entries with the master entry's fields are stored packed, values only.
LUA_PRELUDE = r"""
local FIELDS = {'v', 't', 'a', 'u', 'e', 's', 'i', 'g', 'r', 'c'}

-- Ids follow the site's clock, and never repeat or step back, also across a failover. A primary
-- that has just taken over may lack the last ids of the one before (replication is asynchronous)
-- while a reader, e.g. a live follower resuming by Last-Event-ID, has already seen them. So the
-- first id appended on another primary than the last one jumps 2 s past the newest id it knows.
-- A primary is known by its replication id, which a promotion (and a restart) changes; it is read
-- once per script run, with the one recorded beside the last id.
local epoch, last_epoch
local function next_id(now)
  if not epoch then
    epoch = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
    last_epoch = redis.call('GET', 'sa:audit:epoch')
  end
  local last = redis.call('GET', 'sa:audit:lastid')
  local ms, seq = now, 0
  if last then
    local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
    lms = tonumber(lms)
    if last_epoch ~= epoch then ms = math.max(now, lms + 2000)
    elseif now <= lms then ms = lms; seq = tonumber(lseq) + 1 end
  end
  return string.format('%.0f-%.0f', ms, seq), ms
end

-- User agents repeat across events: each is stored once, events name it by 12 hex digits of
-- its SHA-1 (HSETNX: an entry, once written, never changes).
local function intern_agent(ua)
  if not ua or ua == '' then return '' end
  local key = string.sub(redis.sha1hex(ua), 1, 12)
  redis.call('HSETNX', 'audit:ua', key, ua)
  return key
end

local agent_cache = {}
local function agent(key)
  if not key or key == '' then return '' end
  local ua = agent_cache[key]
  if ua == nil then
    ua = redis.call('HGET', 'audit:ua', key) or ''
    agent_cache[key] = ua
  end
  return ua
end

-- ev: table with keys t, a, u, e, s, i, g, r, c (strings or numbers; nil for absent).
local function emit(now, ev)
  local id, ms = next_id(now)
  local at = tonumber(ev.a) or now
  if at == ms then ev.a = nil else ev.a = string.format('%.0f', at) end
  ev.v = '1'
  -- Before the XADD: should the XADD fail, an unused dictionary entry is all that is left.
  ev.g = intern_agent(ev.g)
  local args = {'XADD', 'audit:log', id}
  for _, f in ipairs(FIELDS) do
    args[#args + 1] = f
    args[#args + 1] = ev[f] or ''
  end
  redis.call(unpack(args))
  redis.call('SET', 'sa:audit:lastid', id)
  if last_epoch ~= epoch then
    redis.call('SET', 'sa:audit:epoch', epoch)
    last_epoch = epoch
  end
  redis.call('XADD', 'audit:t:' .. ev.t, id, 'u', ev.u or '')
  if ev.u and ev.u ~= '' then
    redis.call('XADD', 'audit:u:' .. ev.u, id, 't', ev.t)
  end
  if ev.s and ev.s ~= '' then
    local prev = redis.call('HGET', 'sa:sessev', ev.s)
    redis.call('HSET', 'sa:sessev', ev.s, prev and (prev .. ' ' .. id) or id)
  end
  local hour = math.floor(at / 3600000)
  local day = math.floor(at / 86400000)
  local hkey = 'sa:st:h:' .. string.format('%.0f', hour)
  local dkey = 'sa:st:d:' .. string.format('%.0f', day)
  redis.call('HINCRBY', hkey, ev.t, 1)
  redis.call('EXPIRE', hkey, 3 * 86400)
  redis.call('HINCRBY', dkey, ev.t, 1)
  redis.call('EXPIRE', dkey, 400 * 86400)
  if ev.t == 'login_failed' then
    local mkey = 'sa:st:fm:' .. string.format('%.0f', math.floor(at / 60000))
    redis.call('INCR', mkey)
    redis.call('EXPIRE', mkey, 7200)
    if ev.i and ev.i ~= '' then
      local fkey = 'sa:st:fip:' .. string.format('%.0f', hour)
      redis.call('ZINCRBY', fkey, 1, ev.i)
      redis.call('EXPIRE', fkey, 2 * 86400)
    end
  end
  return id
end

-- When, from where and with what a session began: its login event (the first id in sa:sessev),
-- so the session hash need not repeat it. Returns created (ms), ip, user agent.
local function login_of(ref)
  local ids = redis.call('HGET', 'sa:sessev', ref)
  local login = ids and string.match(ids, '^(%S+)')
  if not login then return 0, '', '' end
  local created, ip, ua = tonumber(string.match(login, '^(%d+)')), '', ''
  local found = redis.call('XRANGE', 'audit:log', login, login)
  if #found == 1 then
    local f = found[1][2]
    for i = 1, #f, 2 do
      if f[i] == 'i' then ip = f[i + 1]
      elseif f[i] == 'g' then ua = agent(f[i + 1])
      elseif f[i] == 'a' and f[i + 1] ~= '' then created = tonumber(f[i + 1]) end
    end
  end
  return created, ip, ua
end

-- A live session's deadline: its score in the deadline index (false when it has none).
local function deadline_of(ref)
  local score = redis.call('ZSCORE', 'sa:deadlines', ref)
  return score and tonumber(score)
end

-- End a session's state (not its event): the caller has emitted the event already.
local function drop_session(ref, uid, member)
  redis.call('DEL', 'sa:s:' .. ref)
  redis.call('ZREM', 'sa:deadlines', member)
  redis.call('SREM', 'sa:us:' .. uid, ref)
end

-- Claim a session whose deadline has passed: `expired` at the deadline, reason idle/lifetime.
-- The hash outlives its deadline by the TTL's slack; after longer downtime its login event
-- (found through sa:sessev) tells the user and, with `lifetime` (ms), the lifetime deadline.
local function expire_member(now, ref, deadline, lifetime)
  local s = redis.call('HMGET', 'sa:s:' .. ref, 'u', 'x')
  local uid, lifetime_dl = s[1], tonumber(s[2])
  if not uid then
    uid = ''
    local ids = redis.call('HGET', 'sa:sessev', ref)
    local login = ids and string.match(ids, '^(%S+)')
    local found = login and redis.call('XRANGE', 'audit:log', login, login) or {}
    if #found == 1 then
      local f, at = found[1][2], tonumber(string.match(login, '^(%d+)'))
      for i = 1, #f, 2 do
        if f[i] == 'u' then uid = f[i + 1] elseif f[i] == 'a' and f[i + 1] ~= '' then at = tonumber(f[i + 1]) end
      end
      if lifetime then lifetime_dl = at + lifetime end
    end
  end
  local reason = 'idle'
  if lifetime_dl and deadline >= lifetime_dl then reason = 'lifetime' end
  local email = uid ~= '' and redis.call('HGET', 'sa:user:' .. uid, 'email') or ''
  emit(now, {t = 'expired', a = deadline, u = uid, e = email or '', s = ref, r = reason})
  drop_session(ref, uid, ref)
  return ref
end
"""


class Script:
    """One Lua script (with the prelude), run by its SHA-1; loaded into Redis on first use.

    Called on every authenticated request, so it goes straight to ``EVALSHA`` rather than through
    redis-py's general Script object. An ``acked`` script changes state that a failover must not
    lose: when the client asks for replicas (``redisconn.set_wait``), it is sent with a ``WAIT``
    behind it on the same connection, in one round trip, and answers only once that many
    replicas hold what it wrote (else ``redisconn.NotReplicated``).
    """

    def __init__(self, redis: aioredis.Redis, body: str, *, acked: bool = False):
        self.redis = redis
        self.source = LUA_PRELUDE + body
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()  # Redis names scripts so
        self.acked = acked

    async def __call__(self, args: Sequence[Any] = ()) -> Any:
        wait = redisconn.wait_of(self.redis) if self.acked else None
        try:
            if wait:
                return await self._run_and_wait(args, *wait)
            try:
                return await self.redis.execute_command("EVALSHA", self.sha, 0, *args)
            except NoScriptError:  # a new or flushed Redis (a new primary after a failover): load it, run it
                await self.redis.script_load(self.source)
                return await self.redis.execute_command("EVALSHA", self.sha, 0, *args)
        except ResponseError as e:
            raise redisconn.refused_write(e) from None

    async def _run_and_wait(self, args: Sequence[Any], replicas: int, timeout_ms: int) -> Any:
        result, acked = await self._pipeline(args, replicas, timeout_ms)
        if isinstance(result, NoScriptError):
            await self.redis.script_load(self.source)
            result, acked = await self._pipeline(args, replicas, timeout_ms)
        for reply in (result, acked):
            if isinstance(reply, Exception):
                raise reply
        if acked < replicas:
            raise redisconn.NotReplicated(f"{acked} of {replicas} replica(s) confirmed the write "
                                          f"within {timeout_ms} ms")
        return result

    async def _pipeline(self, args: Sequence[Any], replicas: int, timeout_ms: int) -> list[Any]:
        # WAIT counts the writes of its own connection: one pipeline, one connection, one round trip.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVALSHA", self.sha, 0, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            return await pipe.execute(raise_on_error=False)


class Scripts:
    """The scripts of one store, each called as ``await scripts.name(args=[...])``.

    ``acked`` names the scripts that change state (see ``Script``): every one that appends an
    event, except the sliding refresh of an authenticated page.
    """

    def __init__(self, redis: aioredis.Redis, *, acked: Collection[str] = (), **sources: str):
        for name, body in sources.items():
            setattr(self, name, Script(redis, body, acked=name in acked))
