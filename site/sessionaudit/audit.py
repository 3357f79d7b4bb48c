"""The read side of the audit trail: pages, exports, timelines, replay and retention.

A page costs one round trip whatever the size of the log: it reads the global stream, or an
index stream (per user, per type) whose entries share the global ids, backwards from a cursor,
and stops after ``limit`` matches or a bounded number of scanned entries. A page that stops at
the scan bound returns its cursor, so "Older" goes on from there.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from . import events, inputs, keys
from .events import Event

# ARGV: source key, direction ('rev' or 'fwd'), from (exclusive cursor or open end),
#       to (bound), want, max_scan, type filter ('' none; only for a user index), since ms, until ms,
#       email filter ('' none: for addresses with no account, whose events have no user index)
# Returns {cursor, exhausted, id1, fields1, id2, fields2, ...}
PAGE = r"""
local src, dir, from, to = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local want, budget, tfilter = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local since, untl, efilter = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]
local main = src == 'audit:log'
local cmd = 'XREVRANGE'
if dir == 'fwd' then cmd = 'XRANGE' end
local out = {'', 0}
local found, scanned, cursor = 0, 0, nil
while found < want and scanned < budget do
  local n = math.min(math.max(want - found, 16) * 2, budget - scanned)
  local chunk = redis.call(cmd, src, from, to, 'COUNT', n)
  if #chunk == 0 then out[2] = 1; break end
  for _, e in ipairs(chunk) do
    scanned = scanned + 1
    cursor = e[1]
    local fields = e[2]
    local keep = true
    if not main then
      if tfilter ~= '' and fields[2] ~= tfilter then
        keep = false
      else
        local ev = redis.call('XRANGE', 'audit:log', e[1], e[1])
        if #ev == 0 then keep = false else fields = ev[1][2] end
      end
    end
    if keep then
      local at = nil
      for i = 1, #fields, 2 do if fields[i] == 'a' and fields[i + 1] ~= '' then at = tonumber(fields[i + 1]) end end
      if not at then at = tonumber(string.match(e[1], '^(%d+)')) end
      if at < since or at > untl then keep = false end
      if keep and efilter ~= '' then
        for i = 1, #fields, 2 do if fields[i] == 'e' and fields[i + 1] ~= efilter then keep = false end end
      end
    end
    if keep then
      for i = 1, #fields, 2 do
        if fields[i] == 'g' then fields[i + 1] = agent(fields[i + 1], e[1]) end
      end
      out[#out + 1] = e[1]; out[#out + 1] = fields
      found = found + 1
      if found >= want then break end
    end
  end
  from = '(' .. cursor
  if #chunk < n and found < want then out[2] = 1; break end
end
out[1] = cursor or ''
return out
"""

# Retention: remove whole sealed batches of events older than ARGV[1] ms, oldest first, at least one
# batch and about ARGV[2] events per call, with their index entries, the seals before the last batch
# removed (its own seal stays: the marker of where the kept trail begins; see seal.py), and the
# user-agent dictionaries of days no kept event is from. Events not sealed yet are never removed.
# Bounded work per call; the sweeper calls it a step at a time.
TRIM = r"""
local cutoff, batch = ARGV[1], tonumber(ARGV[2])
local first = redis.call('XRANGE', 'audit:log', '-', '+', 'COUNT', 1)[1]
if not first then return 0 end
-- The seals from the oldest kept event on, older than the cutoff: add whole batches up to `batch` events.
local boundary, n, from = nil, 0, first[1]
while n < batch do
  local seals = redis.call('XRANGE', 'audit:seal', from, '(' .. cutoff .. '-0', 'COUNT', 16)
  for _, s in ipairs(seals) do
    local d = ''
    for i = 1, #s[2], 2 do if s[2][i] == 'd' then d = s[2][i + 1] end end
    boundary = s[1]
    n = n + math.floor(#d / 8)
    if n >= batch then break end
  end
  if #seals < 16 then break end
  from = '(' .. seals[#seals][1]
end
if not boundary then return 0 end
local old = redis.call('XRANGE', 'audit:log', '-', boundary)
local users, types, sessions, days = {}, {}, {}, {}
for _, e in ipairs(old) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  if f.s and f.s ~= '' then sessions[#sessions + 1] = f.s end
  if f.u and f.u ~= '' then users[f.u] = true end
  if f.t and f.t ~= '' then types[f.t] = true end
  days[math.floor(tonumber(string.match(e[1], '^(%d+)')) / 86400000)] = true
end
local ms, seq = string.match(boundary, '^(%d+)-(%d+)$')
local upto = ms .. '-' .. string.format('%.0f', tonumber(seq) + 1)
-- The stream first: for a user who may not trim it (append-only mode) the script stops here,
-- before it has changed anything, since Redis does not roll a failed script back.
local removed = redis.call('XTRIM', 'audit:log', 'MINID', upto)
for uid, _ in pairs(users) do
  -- A user's index stream that trimming empties goes (an empty stream is still ~380 B, for ever);
  -- the user's next event starts it again. Under an ACL file of an earlier version, which lets the
  -- maintenance user delete no index, it stays (a refused DEL would stop the script half done).
  local index = 'audit:u:' .. uid
  redis.call('XTRIM', index, 'MINID', upto)
  if not redis.call('XRANGE', index, '-', '+', 'COUNT', 1)[1]
     and (not redis.acl_check_cmd or redis.acl_check_cmd('DEL', index)) then
    redis.call('DEL', index)
  end
end
for t, _ in pairs(types) do redis.call('XTRIM', 'audit:t:' .. t, 'MINID', upto) end
for _, s in ipairs(sessions) do redis.call('HDEL', 'sa:sessev', s) end
redis.call('XTRIM', 'audit:seal', 'MINID', boundary)
-- A day's dictionary goes once no kept event is from that day (or an earlier one): every day's,
-- when no event is kept (a later event of the same day writes its agent again).
local kept = redis.call('XRANGE', 'audit:log', '-', '+', 'COUNT', 1)[1]
local kept_ms = kept and tonumber(string.match(kept[1], '^(%d+)'))
local kept_day = kept and math.floor(kept_ms / 86400000) or math.huge
for day, _ in pairs(days) do
  if day < kept_day then redis.call('DEL', 'audit:ua:' .. string.format('%.0f', day)) end
end
local legacy_until = tonumber(redis.call('GET', 'sa:ua:legacy'))
if legacy_until and kept and kept_ms >= legacy_until then
  redis.call('DEL', 'audit:ua')
  redis.call('DEL', 'sa:ua:legacy')
end
return removed
"""

SCAN_BUDGET = 2000  # index entries one page may look at before it returns a cursor
# An `expired` event is recorded a moment after its deadline (its `at`); `until` looks this far
# past its bound so such events are found. Expiries recorded later (after downtime) are not.
UNTIL_GRACE_MS = 5000


class BadQuery(ValueError):
    """A filter value that cannot be used (400)."""


@dataclass(frozen=True)
class Query:
    """Filters of the audit views; parsed from query arguments by ``Query.parse``."""

    user: str | None = None  # email
    type: str | None = None
    since: int | None = None  # ms, inclusive
    until: int | None = None  # ms, inclusive
    before: str | None = None  # stream id: events strictly older
    after: str | None = None  # stream id: events strictly newer (the "Newer" link)
    limit: int = 50
    session: str | None = None

    @classmethod
    def parse(cls, get: Callable[[str], str | None], max_limit: int) -> Query:
        """Build a query from request arguments; raise BadQuery with a readable message."""
        values: dict[str, object] = {}
        if user := (get("user") or "").strip():
            values["user"] = user.lower()
        if kind := (get("type") or "").strip():
            if kind not in events.TYPES:
                raise BadQuery(f"Unknown event type {kind!r}.")
            values["type"] = kind
        for name in ("since", "until"):
            if text := (get(name) or "").strip():
                try:
                    values[name] = inputs.parse_time(text)
                except ValueError:
                    raise BadQuery(f"{name} must be an ISO 8601 date or time, like 2026-11-28T16:00:00Z.") from None
        for name in ("before", "after"):
            if text := (get(name) or "").strip():
                if not inputs.is_event_id(text):
                    raise BadQuery(f"{name} must be an event id, like 1764344150123-0.")
                if name == "before" and inputs.is_first_event_id(text):
                    raise BadQuery("before must be an event id after 0-0: no event is older than it.")
                values[name] = text
        if text := (get("limit") or "").strip():
            try:
                limit = inputs.whole_number(text)
            except ValueError:
                limit = 0
            if limit < 1:
                raise BadQuery("limit must be a positive whole number.")
            values["limit"] = min(limit, max_limit)
        if values.get("since") is not None and values.get("until") is not None and values["since"] > values["until"]:
            raise BadQuery("since is after until.")
        return cls(**values)  # type: ignore[arg-type]

    def args(self, **changes: object) -> dict[str, str]:
        """The query as URL arguments (for links and exports), with some values changed."""
        q = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        out: dict[str, str] = {}
        if q.user:
            out["user"] = q.user
        if q.type:
            out["type"] = q.type
        if q.since is not None:
            out["since"] = events.iso_ms(q.since)
        if q.until is not None:
            out["until"] = events.iso_ms(q.until)
        if q.before:
            out["before"] = q.before
        if q.after:
            out["after"] = q.after
        if q.limit != 50:
            out["limit"] = str(q.limit)
        return out

    @property
    def filtered(self) -> bool:
        return bool(self.user or self.type or self.since is not None or self.until is not None)


@dataclass
class Page:
    events: list[Event]
    older: str | None  # cursor for the next older page, None at the end
    newer: str | None  # cursor for the next newer page, None at the newest


@dataclass
class Summary:
    """What ``audit verify`` found."""

    events: int = 0
    sessions: int = 0
    open_sessions: int = 0
    live_sessions: int = 0
    by_type: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    problems: list[str] = field(default_factory=list)


class AuditLog:
    """Read the trail. Takes Redis in; writes happen in the scripts of the stores that change state."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self.scripts = keys.Scripts(redis, page=PAGE, trim=TRIM)

    async def uid_for(self, email: str) -> str | None:
        uid = await self.redis.hget(keys.EMAILS, email)
        return uid.decode() if uid else None

    async def _source(self, q: Query) -> tuple[str, str, str]:
        """The stream to read, the type filter for its index entries, and an email filter.

        An address with an account has its own index. One without (failed logins for it) is
        found by scanning the trail, or its type's index, a bounded stretch per page.
        """
        if q.user:
            uid = await self.uid_for(q.user)
            if uid is not None:
                return keys.AUDIT_USER + uid, q.type or "", ""
            return (keys.AUDIT_TYPE + q.type if q.type else keys.AUDIT), "", q.user
        if q.type:
            return keys.AUDIT_TYPE + q.type, "", ""
        return keys.AUDIT, "", ""

    async def _scan(self, source: tuple[str, str, str], q: Query, direction: str, cursor: str | None,
                    want: int) -> tuple[list[Event], str | None, bool]:
        src, tfilter, efilter = source
        since = q.since if q.since is not None else 0
        until = q.until if q.until is not None else 2**52
        if direction == "rev":
            start = f"({cursor}" if cursor else "+"
            if q.until is not None and (not cursor or events.id_ms(cursor) > until + UNTIL_GRACE_MS):
                start = str(until + UNTIL_GRACE_MS)
            bound = str(since) if q.since is not None else "-"
        else:
            start = f"({cursor}" if cursor else (str(since) if q.since is not None else "-")
            bound = str(until + UNTIL_GRACE_MS) if q.until is not None else "+"
        out = await self.scripts.page(args=[src, direction, start, bound, want, SCAN_BUDGET, tfilter, since, until,
                                            efilter])
        next_cursor = out[0].decode() or None
        exhausted = bool(out[1])
        found = [Event.from_entry(out[i], events.entry_fields(out[i + 1])) for i in range(2, len(out), 2)]
        return found, next_cursor, exhausted

    async def page(self, q: Query) -> Page:
        """One page, newest first: ``q.limit`` events older than ``q.before`` (or newer than ``q.after``)."""
        source = await self._source(q)
        if q.after:
            found, cursor, exhausted = await self._scan(source, q, "fwd", q.after, q.limit)
            found.reverse()
            newer = None if exhausted else (found[0].id if found else cursor)
            return Page(found, found[-1].id if found else q.after, newer)
        found, cursor, exhausted = await self._scan(source, q, "rev", q.before, q.limit)
        newer = (found[0].id if found else q.before) if q.before else None
        return Page(found, None if exhausted else cursor, newer)

    async def iterate(self, q: Query, chunk: int = 1000) -> AsyncIterator[list[Event]]:
        """Every matching event, newest first, a chunk per round trip (constant memory)."""
        source = await self._source(q)
        cursor = q.before
        while True:
            found, cursor, exhausted = await self._scan(source, q, "rev", cursor, chunk)
            if found:
                yield found
            if exhausted or cursor is None:
                return

    async def export(self, q: Query, chunk: int = 5000) -> AsyncIterator[list[dict[str, Any]]]:
        """Every matching event in its exported form, newest first, a chunk at a time.

        Without a user or type filter it reads the stream itself, fetching the next chunk while
        this one is formatted and sent, and looks each user agent up once.
        """
        if q.user or q.type:
            async for found in self.iterate(q, chunk):
                yield [e.to_json() for e in found]
            return
        since = q.since if q.since is not None else 0
        until = q.until if q.until is not None else 2**52
        start = f"({q.before}" if q.before else "+"
        if q.until is not None and (not q.before or events.id_ms(q.before) > until + UNTIL_GRACE_MS):
            start = str(until + UNTIL_GRACE_MS)
        bound = str(since) if q.since is not None else "-"
        agents: dict[tuple[str, bytes], str | None] = {}
        loop = asyncio.get_running_loop()

        def read(after: str) -> asyncio.Task[Any]:
            # The command name as bytes skips redis-py's reply parser: entries stay flat lists,
            # which export_row_flat reads by position.
            return loop.create_task(self.redis.execute_command(b"XREVRANGE", keys.AUDIT, after, bound,
                                                               "COUNT", chunk))

        pending: asyncio.Task[Any] | None = read(start)
        try:
            while pending is not None:
                entries = await pending
                pending = read("(" + entries[-1][0].decode()) if len(entries) == chunk else None
                if q.since is not None or q.until is not None:
                    entries = [(i, f) for i, f in entries
                               if since <= events.entry_at(i.decode(), events.entry_fields(f)) <= until]
                if len(agents) > 50_000:  # bounded memory, whatever the export's size
                    agents.clear()
                wanted = {(keys.agents_key(i), g) for i, f in entries
                          if (g := f[15] if len(f) == 20 else events.entry_fields(f).get(b"g"))}
                if missing := wanted - agents.keys():
                    agents.update(await agent_texts(self.redis, missing))
                yield [events.export_row_flat(i, f, agents) for i, f in entries]
        finally:
            if pending is not None:
                pending.cancel()

    async def session_events(self, ref: str) -> list[Event]:
        """A session's timeline: its login and its end, oldest first."""
        ids = await self.redis.hget(keys.SESSION_EVENTS, ref)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids.decode().split():
                pipe.xrange(keys.AUDIT, entry_id, entry_id)
            replies = await pipe.execute()
        return await with_agents(self.redis, [Event.from_entry(r[0][0], r[0][1]) for r in replies if r])

    async def trim_step(self, cutoff_ms: int, batch: int = 500) -> int:
        """Remove up to ``batch`` events older than ``cutoff_ms`` (and their index entries)."""
        return int(await self.scripts.trim(args=[cutoff_ms, batch]))

    async def verify(self, chunk: int = 5000) -> Summary:
        """Replay the whole stream and check the session invariants."""
        check = StoryCheck()
        cursor = "-"
        while True:
            entries = await self.redis.execute_command(b"XRANGE", keys.AUDIT, cursor, "+", "COUNT", chunk)
            if not entries:
                break
            check.feed(entries)
            cursor = "(" + entries[-1][0].decode()
        return await check.finish(self.redis)


class StoryCheck:
    """The session stories of ``audit verify``: one login per session, at most one end after it, and
    live sessions exactly the logins without an end. Fed raw stream entries, oldest first, a chunk at
    a time, so the seal verification's pass over the trail can check them too."""

    def __init__(self) -> None:
        self.summary = Summary()
        self.logins: dict[str, str] = {}  # ref -> login id
        self.ended: dict[str, str] = {}  # ref -> end event id

    def feed(self, entries: list[Any]) -> None:
        summary, logins, ended = self.summary, self.logins, self.ended
        for entry_id, flat in entries:
            if len(flat) >= 20 and flat[2] == b"t" and flat[10] == b"s":  # emit()'s field order
                kind, ref = flat[3].decode(), flat[11].decode()
            else:
                f = events.entry_fields(flat)
                kind, ref = f.get(b"t", b"").decode(), f.get(b"s", b"").decode()
            summary.events += 1
            summary.by_type[kind] += 1
            if kind not in events.TYPES:
                summary.problems.append(f"{entry_id.decode()}: unknown type {kind!r}")
            if not ref:
                continue
            if kind == events.LOGIN:
                if ref in logins:
                    summary.problems.append(f"{entry_id.decode()}: second login for session {ref}")
                logins[ref] = entry_id.decode()
            elif kind in events.END_TYPES:
                ident = entry_id.decode()
                if ref not in logins:
                    summary.problems.append(f"{ident}: {kind} for session {ref} with no login before it")
                if ref in ended:
                    summary.problems.append(f"{ident}: second end ({kind}) for session {ref}, first at {ended[ref]}")
                ended[ref] = ident

    async def finish(self, redis: aioredis.Redis) -> Summary:
        """Compare with the live sessions in Redis; the summary."""
        summary, logins, ended = self.summary, self.logins, self.ended
        open_refs = {ref for ref in logins if ref not in ended}
        live = {m.decode().split("|", 1)[0] for m in await redis.zrange(keys.DEADLINES, 0, -1)}
        summary.sessions = len(logins)
        summary.open_sessions = len(open_refs)
        summary.live_sessions = len(live)
        first = await redis.xrange(keys.AUDIT, "-", "+", count=1)
        trimmed_before = first[0][0].decode() if first else None
        for ref in sorted(live - open_refs):
            if ref not in logins and trimmed_before:
                continue  # its login was removed by retention
            summary.problems.append(f"session {ref} is live in Redis but its story has ended or never began")
        for ref in sorted(open_refs - live):
            summary.problems.append(f"session {ref} has a login and no end, but is not live in Redis")
        return summary


async def with_agents(redis: aioredis.Redis, found: list[Event]) -> list[Event]:
    """Events read straight from the stream name their user agent by key (keys.AGENTS): fill in the text."""
    wanted = {(keys.agents_key(e.id), e.user_agent.encode()) for e in found if e.user_agent}
    if not wanted:
        return found
    texts = await agent_texts(redis, wanted)
    return [dataclasses.replace(e, user_agent=texts[keys.agents_key(e.id), e.user_agent.encode()])
            if e.user_agent else e for e in found]


async def agent_texts(redis: aioredis.Redis,
                      wanted: set[tuple[str, bytes]]) -> dict[tuple[str, bytes], str | None]:
    """User-agent texts by (dictionary, key), in one round trip (two when older events use the legacy one)."""
    by_dict: dict[str, list[bytes]] = defaultdict(list)
    for dictionary, key in wanted:
        by_dict[dictionary].append(key)
    async with redis.pipeline(transaction=False) as pipe:
        for dictionary, names in by_dict.items():
            pipe.hmget(dictionary, names)
        replies = await pipe.execute()
    out: dict[tuple[str, bytes], str | None] = {}
    for (dictionary, names), texts in zip(by_dict.items(), replies, strict=True):
        for name, text in zip(names, texts, strict=True):
            out[dictionary, name] = text.decode() if text else None
    if missing := sorted({name for (_, name), text in out.items() if text is None}):
        legacy = dict(zip(missing, await redis.hmget(keys.LEGACY_AGENTS, missing), strict=True))
        for (dictionary, name), text in list(out.items()):
            if text is None and legacy.get(name):
                out[dictionary, name] = legacy[name].decode()
    return out
