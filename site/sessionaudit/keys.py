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

import asyncio
import hashlib
from collections.abc import Collection, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from . import events, redisconn

AUDIT = "audit:log"  # the stream: source of truth
AUDIT_USER = "audit:u:"  # + uid: stream of ids of that user's events, field t = type
AUDIT_TYPE = "audit:t:"  # + type: stream of ids of events of that type
# + day number (of the event id's time): hash 12 hex digits of SHA-1 -> user agent, written once.
# Events store the digits; a day's dictionary goes when retention has removed that day's events.
AGENTS = "audit:ua:"
LEGACY_AGENTS = "audit:ua"  # one dictionary for every day, written before the dictionaries were split
LEGACY_AGENTS_UNTIL = "sa:ua:legacy"  # ms: no event after it names LEGACY_AGENTS (set at the first start)
SESSION_EVENTS = "sa:sessev"  # hash: session ref -> space-separated event ids
LAST_ID = "sa:audit:lastid"  # the last id appended; ids follow the site's clock
EPOCH = "sa:audit:epoch"  # replication id of the primary that appended the last id
USER = "sa:user:"  # + uid: hash id, email, hash, admin, created, disabled
USER_NEXT = "sa:user:next"
EMAILS = "sa:emails"  # hash: normalized email -> uid
# + ref: a session, one short string (see session_of in the prelude); its deadline is its index score
SESSION = "sa:ss:"
LEGACY_SESSION = "sa:s:"  # + ref: a session as earlier versions kept it (a hash), converted at start
MOVED = "sa:st:moved"  # zset: refs of sessions that moved, by the time of their last move (the last 24 hours)
DEADLINES = "sa:deadlines"  # zset: session refs scored by deadline (ms)
USER_SESSIONS = "sa:ui:"  # + uid: hash of the user's live session refs (values empty)
LEGACY_USER_SESSIONS = "sa:us:"  # + uid: the same as a set, as earlier versions kept it
STATS_HOUR = "sa:st:h:"  # + hour number: hash type -> count
STATS_DAY = "sa:st:d:"  # + day number: hash type -> count
FAIL_IPS = "sa:st:fip:"  # + hour number: zset ip -> failures (the FAIL_IPS_MAX addresses with most)
FAIL_IPS_MAX = 1000
FAIL_MINUTE = "sa:st:fm:"  # + minute number: failed logins in that minute
FAIL_ACCOUNT = "sa:f:a:"  # + email: throttle state (see throttle.py)
FAIL_ADDRESS = "sa:f:i:"  # + ip (IPv6: its /64, "2001:db8:0:1::/64")
FAIL_DEVICE = "sa:f:d:"  # + device id: failures made with that browser's device cookie
FAIL_REGISTER = "sa:f:r:"  # + ip (as FAIL_ADDRESS): refused registrations
THROTTLE_DUE = "sa:f:due"  # zset: throttle keys with refused attempts not yet recorded, by when they are due
# Second factors (factors.py, passkeys.py). Secrets are stored encrypted (factors.SecretBox).
MFA = "sa:mfa:"  # + uid: hash totp (encrypted secret), step (last accepted time step), since (ms)
MFA_KEY = "sa:mfa:key"  # the data key sealing TOTP secrets, itself sealed under COOKIE_SECRET (factors.py)
RECOVERY = "sa:rc:"  # + uid: set of HMACs of the unused recovery codes
TOTP_SETUP = "sa:totp:setup:"  # + uid: hash c (encrypted secret not yet confirmed), x (deadline ms); TTL
PENDING_LOGIN = "sa:lp:"  # + SHA-256 of the pending step's id: hash u, e (email), n (next), x (deadline); TTL
PASSKEY = "sa:pk:"  # + passkey ref: hash u, id, k (COSE key), n (sign count), name, a (added), l (last used), ...
PASSKEYS = "sa:pks:"  # + uid: set of that user's passkey refs
CHALLENGE_USED = "sa:wc:"  # + challenge nonce: a WebAuthn challenge already used; TTL until it expires
# Tamper evidence (seal.py): one entry per sealed batch of events, its id the id of the batch's last
# event; written by the process that holds the lease (its token and expiry, in ms of the site's clock).
SEALS = "audit:seal"
SEAL_LEASE = "sa:seal:lease"
agents_key = events.agents_key


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

local function day_of(id)
  return string.format('%.0f', math.floor(tonumber(string.match(id, '^(%d+)')) / 86400000))
end

-- User agents repeat across events: each is stored once a day, in that day's dictionary, and
-- events name it by 12 hex digits of its SHA-1 (HSETNX: an entry, once written, never changes).
-- Retention drops a day's dictionary with that day's events.
local function intern_agent(ua, id)
  if not ua or ua == '' then return '' end
  local key = string.sub(redis.sha1hex(ua), 1, 12)
  redis.call('HSETNX', 'audit:ua:' .. day_of(id), key, ua)
  return key
end

-- The text of the user agent that the event `id` names by `key`.
local agent_cache = {}
local function agent(key, id)
  if not key or key == '' then return '' end
  local known = agent_cache.known  -- {key, text} a caller already has (the request's own agent)
  if known and known[1] == key then return known[2] end
  local dict = 'audit:ua:' .. day_of(id)
  local ua = agent_cache[dict .. key]
  if ua == nil then
    ua = redis.call('HGET', dict, key) or redis.call('HGET', 'audit:ua', key) or ''
    agent_cache[dict .. key] = ua
  end
  return ua
end

-- The dashboard's counters: `n` events of type `t` at `at` (ms); logins also by how they were proved
-- (field 'login:<reason>', one of the four the scripts pass); failed logins also by minute and by
-- address (the FAIL_IPS_MAX addresses with most failures each hour: a flood from many addresses
-- cannot grow the table).
local function count_stats(at, t, ip, n, reason)
  local hour = math.floor(at / 3600000)
  local day = math.floor(at / 86400000)
  local hkey = 'sa:st:h:' .. string.format('%.0f', hour)
  local dkey = 'sa:st:d:' .. string.format('%.0f', day)
  redis.call('HINCRBY', hkey, t, n)
  redis.call('EXPIRE', hkey, 3 * 86400)
  redis.call('HINCRBY', dkey, t, n)
  redis.call('EXPIRE', dkey, 400 * 86400)
  if t == 'login' and reason and reason ~= '' then
    redis.call('HINCRBY', hkey, 'login:' .. reason, n)
    redis.call('HINCRBY', dkey, 'login:' .. reason, n)
  end
  if t == 'login_failed' then
    local mkey = 'sa:st:fm:' .. string.format('%.0f', math.floor(at / 60000))
    redis.call('INCRBY', mkey, n)
    redis.call('EXPIRE', mkey, 7200)
    if ip and ip ~= '' then
      local fkey = 'sa:st:fip:' .. string.format('%.0f', hour)
      redis.call('ZINCRBY', fkey, n, ip)
      if redis.call('ZCARD', fkey) > 1000 then redis.call('ZPOPMIN', fkey) end
      redis.call('EXPIRE', fkey, 2 * 86400)
    end
  end
end

-- ev: table with keys t, a, u, e, s, i, g, r, c (strings or numbers; nil for absent), and for a
-- summary of refused attempts n (count), f (first attempt, ms) and k (distinct user agents): those
-- attempts were counted on the dashboard as they came, so the summary is not counted again.
local function emit(now, ev)
  local id, ms = next_id(now)
  local at = tonumber(ev.a) or now
  if at == ms then ev.a = nil else ev.a = string.format('%.0f', at) end
  ev.v = '1'
  -- Before the XADD: should the XADD fail, an unused dictionary entry is all that is left.
  ev.g = intern_agent(ev.g, id)
  local args = {'XADD', 'audit:log', id}
  for _, f in ipairs(FIELDS) do
    args[#args + 1] = f
    args[#args + 1] = ev[f] or ''
  end
  if ev.n then
    for _, f in ipairs({'n', 'f', 'k'}) do
      args[#args + 1] = f
      args[#args + 1] = ev[f] or ''
    end
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
    -- A session's timeline: its login, its end, and its first moves (a session that keeps moving
    -- has the rest in the trail, and cannot grow this entry past about 1 KB).
    local prev = redis.call('HGET', 'sa:sessev', ev.s)
    if not prev or ev.t ~= 'session_changed' or #prev < 1024 then
      redis.call('HSET', 'sa:sessev', ev.s, prev and (prev .. ' ' .. id) or id)
    end
  end
  if not ev.n then count_stats(at, ev.t, ev.i, 1, ev.r) end
  return id
end

-- Numbers in session strings are written in base 36 (shorter: the string stays in Redis's smallest
-- allocation for it); tonumber(text, 36) reads them back.
local function base36(n)
  n = math.floor(n)
  if n == 0 then return '0' end
  local digits, out = '0123456789abcdefghijklmnopqrstuvwxyz', ''
  while n > 0 do
    local d = n % 36
    out = string.sub(digits, d + 1, d + 1) .. out
    n = (n - d) / 36
  end
  return out
end

-- A session: the string 'sa:ss:<ref>' = "uid pair moved login ip agent [last]": the digest of the
-- address and browser it last used (base 36, '-' unknown), how it moved since sign-in (0-3), its
-- login event's id time (base 36: when it began, and which day's dictionary names its agent), the
-- address and agent key of that login ('-' none), and its last request once its deadline is its
-- lifetime's (before, the deadline index tells: last = deadline - idle). Nil when there is none.
local function parse_session(raw)
  local uid, pair, moved, login, ip, agent_key, last =
    string.match(raw, '^(%S+) (%S+) (%d) (%w+) (%S+) (%S+) ?(%w*)$')
  if not uid then return nil end
  return {uid = uid, pair = pair, moved = tonumber(moved), login = tonumber(login, 36),
          ip = ip ~= '-' and ip or '', agent = agent_key ~= '-' and agent_key or '',
          last = last ~= '' and tonumber(last, 36) or nil}
end

local function session_of(ref)
  local raw = redis.call('GET', 'sa:ss:' .. ref)
  return raw and parse_session(raw)
end

local function session_string(s)
  local out = s.uid .. ' ' .. s.pair .. ' ' .. s.moved .. ' ' .. base36(s.login) .. ' ' ..
              (s.ip ~= '' and s.ip or '-') .. ' ' .. (s.agent ~= '' and s.agent or '-')
  if s.last then out = out .. ' ' .. base36(s.last) end
  return out
end

-- A live session's deadline: its score in the deadline index (false when it has none).
local function deadline_of(ref)
  local score = redis.call('ZSCORE', 'sa:deadlines', ref)
  return score and tonumber(score)
end

-- End a session's state (not its event): the caller has emitted the event already.
local function drop_session(ref, uid)
  redis.call('DEL', 'sa:ss:' .. ref)
  redis.call('ZREM', 'sa:deadlines', ref)
  redis.call('HDEL', 'sa:ui:' .. uid, ref)
end

-- Claim a session whose deadline has passed: `expired` at the deadline, reason idle or lifetime
-- (`lifetime` ms after it began). The string outlives its lifetime a little (its TTL, a backstop);
-- after longer downtime its login event (found through sa:sessev) tells whose it was.
local function expire_member(now, ref, deadline, lifetime)
  local s = session_of(ref)
  local uid, began = s and s.uid, s and s.login
  if not uid then
    uid = ''
    local ids = redis.call('HGET', 'sa:sessev', ref)
    local login = ids and string.match(ids, '^(%S+)')
    local found = login and redis.call('XRANGE', 'audit:log', login, login) or {}
    if #found == 1 then
      local f = found[1][2]
      began = tonumber(string.match(login, '^(%d+)'))
      for i = 1, #f, 2 do
        if f[i] == 'u' then uid = f[i + 1] elseif f[i] == 'a' and f[i + 1] ~= '' then began = tonumber(f[i + 1]) end
      end
    end
  end
  local reason = 'idle'
  if began and deadline >= began + lifetime then reason = 'lifetime' end
  local email = uid ~= '' and redis.call('HGET', 'sa:user:' .. uid, 'email') or ''
  emit(now, {t = 'expired', a = deadline, u = uid, e = email or '', s = ref, r = reason})
  drop_session(ref, uid)
  return ref
end

-- What one run may cache (the epoch, user agents read). A script's chunk runs afresh each time; a
-- Redis 7 function's library stays loaded between calls, so its entry point calls this first.
local function fresh_state()
  epoch, last_epoch, agent_cache = nil, nil, {}
end
"""


class Script:
    """One Lua script (with the prelude), run by its SHA-1; loaded into Redis on first use.

    Called on every authenticated request, so it goes straight to ``EVALSHA`` rather than through
    redis-py's general Script object. An ``acked`` script changes state that a failover must not
    lose: when the client asks for replicas (``redisconn.set_wait``), it is sent with a ``WAIT``
    behind it on the same connection, in one round trip, and answers only once that many
    replicas hold what it wrote (else ``redisconn.NotReplicated``).

    A ``function`` script (the authenticated page's) runs as a Redis 7 function where Redis has
    them: its library (the prelude and ``helpers``) is loaded once, so a call no longer builds
    the prelude's closures, which is most of what a script costs Redis before it does anything.
    The library is named by the script's SHA-1, so processes of different versions sharing one
    Redis each call their own. On Redis 6, or for a Redis user that may not load or call
    functions, it is an ordinary script.
    """

    def __init__(self, redis: aioredis.Redis, body: str, *, acked: bool = False, batched: bool = False,
                 helpers: str = "", function: bool = False):
        self.redis = redis
        self.source = LUA_PRELUDE + helpers + body
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()  # Redis names scripts so
        self.acked = acked
        self.batched = batched and not acked
        self.function = f"sa_{self.sha[:20]}" if function else ""
        self.library = (f"#!lua name={self.function}\nlocal ARGV\n{LUA_PRELUDE}{helpers}"
                        f"local function body()\n{body}\nend\n"
                        f"redis.register_function('{self.function}', "
                        "function(_, args) ARGV = args; fresh_state(); return body() end)\n")
        self._queue: list[tuple[Sequence[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def _command(self) -> tuple[str, str]:
        return ("FCALL", self.function) if self.function else ("EVALSHA", self.sha)

    def _missing(self, e: object) -> bool:
        """Is ``e`` Redis saying it lacks the script (or function), or cannot run functions at all?"""
        if isinstance(e, NoScriptError):
            return True
        return bool(self.function) and isinstance(e, ResponseError) and (
            str(e).startswith("Function not found") or _functions_refused(e))

    async def _load(self) -> None:
        """Load the script into Redis: as a function where it can be, else as a script."""
        if self.function:
            try:
                await self.redis.execute_command("FUNCTION", "LOAD", "REPLACE", self.library)
                return
            except ResponseError as e:
                if not _functions_refused(e):
                    raise
                self.function = ""  # Redis 6, or not allowed by the ACL: an ordinary script
        await self.redis.script_load(self.source)

    async def __call__(self, args: Sequence[Any] = ()) -> Any:
        if self.batched:
            return await self._batch(args)
        wait = redisconn.wait_of(self.redis) if self.acked else None
        if wait:
            try:
                return await self._run_and_wait(args, *wait)
            except ResponseError as e:
                raise redisconn.refused_write(e) from None
        return await self._run(args)

    async def _run(self, args: Sequence[Any]) -> Any:
        try:
            try:
                return await self.redis.execute_command(*self._command(), 0, *args)
            except ResponseError as e:  # a new or flushed Redis (a new primary after a failover): load it, run it
                if not self._missing(e):
                    raise
                await self._load()
                return await self.redis.execute_command(*self._command(), 0, *args)
        except ResponseError as e:
            raise redisconn.refused_write(e) from None

    # A batched script (the authenticated page's): the calls made in one turn of the event loop go to
    # Redis as one pipeline. Each call is still its own script in Redis and each page still costs one
    # round trip, but concurrent pages share the client's per-command work (a connection from the
    # pool, its checks, a write, a read), which redis-py spends more CPU on than the script itself.

    async def _batch(self, args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)  # after the other requests of this turn have queued theirs
        return await future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                try:
                    results: list[Any] = [await self._run(batch[0][0])]
                except ResponseError as e:
                    results = [e]
            else:
                results = await self._run_many([args for args, _ in batch])
        except BaseException as e:  # the connection, for every call of the batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(redisconn.refused_write(result) if isinstance(result, ResponseError) else result)
            else:
                future.set_result(result)

    async def _run_many(self, batch: list[Sequence[Any]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for args in batch:
                pipe.execute_command(*self._command(), 0, *args)
            results = await pipe.execute(raise_on_error=False)
        missing = [self._missing(r) for r in results]
        if any(missing):  # a new or flushed Redis: load it, run those again
            await self._load()
            for i, args in enumerate(batch):
                if missing[i]:
                    try:
                        results[i] = await self.redis.execute_command(*self._command(), 0, *args)
                    except ResponseError as e:
                        results[i] = e
        return results

    async def _run_and_wait(self, args: Sequence[Any], replicas: int, timeout_ms: int) -> Any:
        result, acked = await self._pipeline(args, replicas, timeout_ms)
        if self._missing(result):
            await self._load()
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
            pipe.execute_command(*self._command(), 0, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            return await pipe.execute(raise_on_error=False)


def _functions_refused(e: ResponseError) -> bool:
    """Redis cannot (version 6) or may not (the ACL) load or call functions."""
    text = str(e).lower()
    return "unknown command" in text or ("permission" in text and ("'fcall'" in text or "'function" in text))


class Scripts:
    """The scripts of one store, each called as ``await scripts.name(args=[...])``.

    ``acked`` names the scripts that change state (see ``Script``): every one that appends an
    event, except the sliding refresh of an authenticated page. ``batched`` names the ones whose
    concurrent calls share a pipeline, ``functions`` the ones run as Redis functions where Redis
    has them (the authenticated page's). A source is a body, or a pair (helpers, body): Lua
    functions the body calls, loaded once with the prelude when it runs as a function.
    """

    def __init__(self, redis: aioredis.Redis, *, acked: Collection[str] = (), batched: Collection[str] = (),
                 functions: Collection[str] = (), **sources: str | tuple[str, str]):
        for name, source in sources.items():
            helpers, body = source if isinstance(source, tuple) else ("", source)
            setattr(self, name, Script(redis, body, helpers=helpers, acked=name in acked, batched=name in batched,
                                       function=name in functions))
