"""Tamper evidence for the audit trail: HMAC-SHA256 seals chained over every event, a copy of the
newest seal outside Redis, and the verification that names the first event that is not what was sealed.

The chain. Events are sealed in batches, in stream order. An event's canonical form is its exported
JSON object (``Event.to_json``, the user agent as text: the dictionary that holds the text is
covered too) serialised by orjson with sorted keys, so an ``.ndjson`` export can be checked offline.
For a batch e_1..e_n whose last event has id X::

    f_i = HMAC(K, canonical(e_i))                                            per event, 32 bytes
    m   = HMAC(K, "sessionaudit seal 1\\n" || m_prev || "X\\n" || "T\\n" || f_1 || ... || f_n)

K is the key the seal names (``c<v>``: derived from COOKIE_SECRET version v; ``a<v>``: from
AUDIT_KEY version v), T the number of events sealed since the chain began, and m_prev the previous
seal's m (32 zero bytes before the first seal). Each batch is one entry of the stream ``audit:seal``
with id X and fields ``k`` (key name), ``t`` (T), ``m`` (32 bytes) and ``d``: the first 8 bytes of
each f_i, packed. The digests say which event is wrong (deleted, altered, inserted, out of order);
m proves the batch, and through m_prev every batch before it. About 8 bytes an event in Redis.

Who writes. One process at a time holds the lease (``sa:seal:lease``, token and expiry in the site's
clock, renewed every second) and seals what is new, a batch of at most BATCH_MAX events per script
call; the script re-checks the lease and that the newest seal is still the one it chained from, so
a process that lost the lease, or two processes, cannot fork the chain. A takeover continues from
the newest seal in Redis. Retention (``audit.TRIM``) removes whole sealed batches and leaves the
seal of the last one it removed: the marker of where the kept trail begins.

Outside Redis. Every process keeps ``<data-dir>/audit-seal.json`` (the newest seal it has seen
chain on from the one already in the file: id, count, chain value; written whole, atomically) and
the sealing process logs the newest seal every SEAL_LOG_EVERY seconds. Wiping Redis, or removing
the newest events together with their seals, leaves a trail shorter than that copy says.

Verification. ``verify_redis`` (``audit verify``, and every process in the background, a pass
after another with bounded CPU) and ``verify_export`` (``audit verify --file``) recompute the chain
from the oldest kept event. The key never leaves the process: not in Redis, a log or a page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from . import events, inputs, keys, redisconn
from .audit import agent_texts
from .config import Settings, hkdf

log = logging.getLogger("sessionaudit.seal")

LABEL = "sessionaudit audit seal"  # HKDF label of the seal key
DIGEST_BYTES = 8  # per-event digest kept in Redis: names the event; the chain value proves it
BATCH_MAX = 2000  # events per seal at most: 16,000 bytes of digests, just within a 16 KiB allocation
GENESIS = bytes(32)  # m_prev of the first seal
OUTSIDE_NAME = "audit-seal.json"
SEAL_LOG_EVERY = 10.0  # seconds between log lines of the newest seal (while events are sealed)
READ_BATCHES = 4  # batches read (one XRANGE) and sealed (one pipeline) per round trip
CATCH_UP = 10 * BATCH_MAX  # a backlog beyond which the sealer leaves half the IOLoop's time to requests
UNSEALED_GRACE_MS = 10_000  # an event this long unsealed means sealing is not keeping up
EVENT_CHUNK = 2000  # events read per round trip by `audit verify`
SLICE = 500  # events worked on at a time in the site (a few milliseconds), the IOLoop's other work in between
SEAL_CHUNK = 32  # seals read per round trip while verifying

# Problem kinds.
ALTERED, DELETED, INSERTED, REORDERED = "altered", "deleted", "inserted", "reordered"
SEALS_MISSING, SEAL_ALTERED, NO_KEY, CUT_OFF, EARLY_TRIM = "seals_missing", "seal_altered", "no_key", "cut_off", \
    "early_trim"

# ARGV: now (ms), token, lease (ms). The lease is the token and its expiry in the site's clock; the
# Redis TTL is only a backstop for a clock that stands still (tests) or a process that died.
# Returns 0 when another process holds it, else the id of the newest event ('' for none): a sealer
# with nothing new to seal spends one round trip a round.
LEASE = r"""
local now, token, ms = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local cur = redis.call('GET', 'sa:seal:lease')
if cur then
  local holder, exp = string.match(cur, '^(%S+) (%d+)$')
  if holder ~= token and exp and tonumber(exp) > now then return 0 end
end
redis.call('SET', 'sa:seal:lease', token .. ' ' .. string.format('%.0f', now + ms), 'PX', ms * 6)
local newest = redis.call('XREVRANGE', 'audit:log', '+', '-', 'COUNT', 1)[1]
return newest and newest[1] or ''
"""

RELEASE = r"""
local cur = redis.call('GET', 'sa:seal:lease')
if cur and string.match(cur, '^(%S+) ') == ARGV[1] then redis.call('DEL', 'sa:seal:lease') return 1 end
return 0
"""

# ARGV: now, token, previous seal id ('' for none), id, k, t, m, d. Appends the seal only while the
# lease is this process's and the newest seal is still the one the new one chains from.
SEAL = r"""
local now, token, prev = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local cur = redis.call('GET', 'sa:seal:lease')
local holder, exp = nil, nil
if cur then holder, exp = string.match(cur, '^(%S+) (%d+)$') end
if holder ~= token or not exp or tonumber(exp) <= now then return 'lease' end
local last = redis.call('XREVRANGE', 'audit:seal', '+', '-', 'COUNT', 1)[1]
if (last and last[1] or '') ~= prev then return 'moved' end
redis.call('XADD', 'audit:seal', ARGV[4], 'k', ARGV[5], 't', ARGV[6], 'm', ARGV[7], 'd', ARGV[8])
return 'ok'
"""


# -- keys and MACs --------------------------------------------------------------------------------

class Mac:
    """HMAC-SHA256 with one key (RFC 2104), the keyed pads hashed once: a third of ``hmac.digest``'s time
    on the short messages here."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def __call__(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class SealKeys:
    """The seal keys by name (``c1``: from COOKIE_SECRET version 1; ``a2``: AUDIT_KEY version 2) and
    the name new seals use: the newest AUDIT_KEY when one is set, else the newest COOKIE_SECRET."""

    def __init__(self, secrets_by_name: dict[str, bytes], current: str | None):
        self._macs = {name: Mac(key) for name, key in secrets_by_name.items()}
        self.current = current

    @classmethod
    def from_settings(cls, settings: Settings) -> SealKeys:
        found = {f"c{v}": settings.derived_key(LABEL, v) for v in settings.cookie_secret}
        found.update({f"a{v}": hkdf(s.encode(), LABEL) for v, s in settings.audit_key.items()})
        if settings.audit_key:
            current: str | None = f"a{max(settings.audit_key)}"
        elif settings.cookie_secret:
            current = f"c{max(settings.cookie_secret)}"
        else:
            current = None
        return cls(found, current)

    def mac(self, name: str) -> Mac | None:
        return self._macs.get(name)

    def __bool__(self) -> bool:
        return bool(self._macs)


def canonical(row: dict[str, Any]) -> bytes:
    """An exported event as the bytes its seal covers: orjson, keys sorted (the same from a re-read export)."""
    return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)


def exported(entry_id: bytes, flat: list[bytes], agents: dict[tuple[str, bytes], str | None]) -> dict[str, Any]:
    """A raw stream entry in its exported form (``Event.to_json``), which its seal covers.

    An entry that is not an event the site could have written (a field that should be a number is
    not) has no exported form: its raw fields stand in, so it is sealed and checked like any other
    rather than stopping the sealer.
    """
    try:
        return events.export_row_flat(entry_id, flat, agents)
    except (ValueError, UnicodeDecodeError, IndexError):
        raw = zip(flat[::2], flat[1::2], strict=False)
        return {"id": entry_id.decode(errors="replace"),
                "raw": {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw}}


def chain_value(mac: Mac, prev: bytes, seal_id: str, total: int, fulls: bytes) -> bytes:
    """m of a seal: the previous seal's m, its own id and running count, and its events' full MACs."""
    return mac(b"sessionaudit seal 1\n" + prev + f"{seal_id}\n{total}\n".encode() + fulls)


def idkey(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# -- seals -------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Seal:
    """One sealed batch: its id is its last event's."""

    id: str
    key: str
    total: int  # events sealed since the chain began, this batch included
    mac: bytes  # the chain value m
    digests: bytes  # DIGEST_BYTES per event, in order

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST_BYTES

    @property
    def before(self) -> int:
        """Events sealed before this batch (0: the first seal, chained from GENESIS)."""
        return self.total - self.count

    def digest_list(self) -> list[bytes]:
        d = self.digests
        return [d[i:i + DIGEST_BYTES] for i in range(0, len(d), DIGEST_BYTES)]

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Seal:
        """From an ``audit:seal`` entry; ValueError when it is not a well-formed seal."""
        ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            seal = cls(ident, fields[b"k"].decode(), int(fields[b"t"]), fields[b"m"], fields[b"d"])
        except (KeyError, ValueError, UnicodeDecodeError):
            raise ValueError(f"seal {ident} is malformed") from None
        if len(seal.mac) != 32 or not seal.digests or len(seal.digests) % DIGEST_BYTES or seal.total < seal.count:
            raise ValueError(f"seal {ident} is malformed")
        return seal

    def to_json(self) -> dict[str, Any]:
        """The seal as a line of an export (``/admin/audit.ndjson?seals=1``)."""
        return {"seal": self.id, "key": self.key, "events": self.total, "mac": self.mac.hex(),
                "digests": base64.b64encode(self.digests).decode()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Seal:
        try:
            seal = cls(str(obj["seal"]), str(obj["key"]), int(obj["events"]), bytes.fromhex(obj["mac"]),
                       base64.b64decode(obj["digests"], validate=True))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"seal line {obj.get('seal')!r} is malformed") from None
        if not inputs.is_event_id(seal.id) or len(seal.mac) != 32 or not seal.digests \
                or len(seal.digests) % DIGEST_BYTES or seal.total < seal.count:
            raise ValueError(f"seal line {seal.id!r} is malformed")
        return seal


@dataclass(frozen=True, slots=True)
class Head:
    """The chain's state after a seal: where the next one goes on from."""

    id: str  # "" before the first seal
    mac: bytes
    total: int

    @classmethod
    def of(cls, seal: Seal) -> Head:
        return cls(seal.id, seal.mac, seal.total)


START = Head("", GENESIS, 0)


def make_seal(mac: Mac, name: str, prev: Head, seal_id: str, fulls: list[bytes]) -> Seal:
    """The seal of a batch whose events' MACs are ``fulls`` (oldest first; the last one's id is
    ``seal_id``), chained on from ``prev``."""
    total = prev.total + len(fulls)
    return Seal(seal_id, name, total, chain_value(mac, prev.mac, seal_id, total, b"".join(fulls)),
                b"".join(f[:DIGEST_BYTES] for f in fulls))


async def canonical_rows(entries: list[Any], agents: dict[tuple[str, bytes], str | None]) -> list[tuple[str, bytes]]:
    """Raw entries as (id, canonical form), a SLICE at a time with the IOLoop's other work in between."""
    rows: list[tuple[str, bytes]] = []
    for k in range(0, len(entries), SLICE):
        if k:
            await asyncio.sleep(0)
        rows.extend((r["id"], canonical(r)) for r in (exported(i, f, agents) for i, f in entries[k:k + SLICE]))
    return rows


@dataclass(frozen=True)
class Problem:
    """What verification found wrong, in words an admin can act on, and the event or seal it names."""

    kind: str
    message: str
    event: str | None = None
    seal: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "event": self.event, "seal": self.seal}


def check_batch(keys_: SealKeys, prev: Head, seal: Seal, rows: list[tuple[str, bytes]]) -> Problem | None:
    """Whether ``rows`` (id, canonical form: the events after ``prev`` up to ``seal.id``, in order) are
    exactly the events ``seal`` sealed, chained from ``prev``. None when they are."""
    if seal.before != prev.total:
        if seal.before > prev.total:
            gap = seal.before - prev.total
            return Problem(SEALS_MISSING, f"{gap} event(s) after {prev.id or 'the start of the chain'} are covered by "
                                          f"no seal: the seal(s) before {seal.id} are missing", seal=seal.id)
        return Problem(SEAL_ALTERED, f"seal {seal.id} does not follow seal {prev.id or '(start)'}: it counts "
                                     f"{seal.before} events before it, the chain {prev.total}", seal=seal.id)
    mac = keys_.mac(seal.key)
    if mac is None:
        return Problem(NO_KEY, f"seal {seal.id} was made with key {seal.key}, which is not configured here "
                               "(keep every COOKIE_SECRET / AUDIT_KEY version that sealed kept events)", seal=seal.id)
    fulls = [mac(c) for _, c in rows]
    got = [f[:DIGEST_BYTES] for f in fulls]
    want = seal.digest_list()
    if got != want:
        return _misfit(rows, got, want, prev, seal)
    if chain_value(mac, prev.mac, seal.id, seal.total, b"".join(fulls)) != seal.mac:
        return Problem(SEAL_ALTERED, f"seal {seal.id} was altered: its events match their digests but not its "
                                     "chain value", seal=seal.id)
    return None


def _misfit(rows: list[tuple[str, bytes]], got: list[bytes], want: list[bytes], prev: Head, seal: Seal) -> Problem:
    """Name the first event that differs from what ``seal`` sealed: align the events' digests with the sealed ones."""
    where = {d: j for j, d in enumerate(want)}
    i = j = 0
    while i < len(rows) and j < len(want):
        if got[i] == want[j]:
            i += 1
            j += 1
            continue
        ident = rows[i][0]
        k = where.get(got[i])
        if k is None:
            # Inserted when the events after it line up with the sealed ones from here; else altered.
            nxt = next((i2 for i2 in range(i + 1, len(rows)) if got[i2] in where), None)
            if nxt is not None and where[got[nxt]] == j:
                return Problem(INSERTED, f"event {ident} was inserted: seal {seal.id} does not include it",
                               event=ident, seal=seal.id)
            return Problem(ALTERED, f"event {ident} was altered: it does not match its seal{_which(seal, ident)}",
                           event=ident, seal=seal.id)
        if k > j:
            if want[j] in got[i + 1:]:
                return Problem(REORDERED, f"event {ident} is out of order: seal {seal.id} has it later",
                               event=ident, seal=seal.id)
            after = rows[i - 1][0] if i else (prev.id or None)
            return _deleted(seal, after, ident)
        return Problem(REORDERED, f"event {ident} is out of order: seal {seal.id} has it earlier",
                       event=ident, seal=seal.id)
    if i < len(rows):
        ident = rows[i][0]
        return Problem(INSERTED, f"event {ident} was inserted: seal {seal.id} does not include it",
                       event=ident, seal=seal.id)
    after = rows[-1][0] if rows else (prev.id or None)
    if j == len(want) - 1:  # the batch's last event: its id is the seal's
        return Problem(DELETED, f"event {seal.id} was deleted: seal {seal.id} includes it", event=seal.id,
                       seal=seal.id)
    return _deleted(seal, after, None)


def _which(seal: Seal, ident: str) -> str:
    return "" if seal.id == ident else f" ({seal.id})"


def _deleted(seal: Seal, after: str | None, before: str | None) -> Problem:
    where = f"after event {after}" if after else "at the start of the kept trail"
    where += f" and before event {before}" if before else f", up to {seal.id}"
    return Problem(DELETED, f"an event was deleted {where}: seal {seal.id} includes it", seal=seal.id,
                   event=None)


# -- reading the trail in canonical form -----------------------------------------------------------

class Trail:
    """Events in canonical form, oldest first, read a chunk per round trip (the next one fetched while
    this one is worked on); user-agent texts looked up once per chunk and cached (bounded)."""

    def __init__(self, redis: aioredis.Redis, after: str, chunk: int = EVENT_CHUNK,
                 on_entries: Callable[[list[Any]], None] | None = None,
                 pace: Callable[[], Awaitable[None]] | None = None):
        self.redis = redis
        self.cursor = f"({after}" if after else "-"
        self.chunk = chunk
        self.on_entries = on_entries
        self.pace = pace
        self.rows: list[tuple[str, bytes]] = []  # read, not yet taken
        self.pos = 0
        self.read = 0  # events read
        self.cpu = 0.0
        self._agents: dict[tuple[str, bytes], str | None] = {}
        self._next: asyncio.Task[Any] | None = None

    def _fetch(self) -> asyncio.Task[Any]:
        # The command name as bytes: replies stay flat lists (see AuditLog.export).
        return asyncio.get_running_loop().create_task(
            self.redis.execute_command(b"XRANGE", keys.AUDIT, self.cursor, "+", "COUNT", self.chunk))

    async def _more(self) -> bool:
        """Read the next chunk (the one fetched ahead, when there is one); False when there was nothing.

        Never final: a pass that reaches the newest event may find more there later (appended and
        sealed while it ran), so an empty read only means "nothing yet"."""
        task, self._next = self._next or self._fetch(), None
        entries = await task
        if not entries:
            return False
        self.cursor = "(" + entries[-1][0].decode()
        if len(entries) == self.chunk:
            self._next = self._fetch()
        if self.on_entries:
            self.on_entries(entries)
        await fill_agents(self.redis, entries, self._agents)
        started = time.thread_time()
        rows = [(r["id"], canonical(r)) for r in (exported(i, f, self._agents) for i, f in entries)]
        self.rows = self.rows[self.pos:] + rows
        self.pos = 0
        self.read += len(rows)
        self.cpu += time.thread_time() - started
        if self.pace:
            await self.pace()
        return True

    async def through(self, last: str) -> list[tuple[str, bytes]]:
        """The events up to and including id ``last`` not taken yet."""
        bound = idkey(last)
        taken: list[tuple[str, bytes]] = []
        while True:
            rows, pos = self.rows, self.pos
            end = pos
            while end < len(rows) and idkey(rows[end][0]) <= bound:
                end += 1
            taken.extend(rows[pos:end])
            self.pos = end
            if end < len(rows) or not await self._more():
                return taken

    async def first_left(self) -> str | None:
        """The id of the oldest event not taken yet (None: all were)."""
        if self.pos < len(self.rows) or await self._more():
            return self.rows[self.pos][0]
        return None

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None


async def fill_agents(redis: aioredis.Redis, entries: list[Any], cache: dict[tuple[str, bytes], str | None]) -> None:
    """Look up the user-agent texts that raw entries name and the cache lacks (one round trip)."""
    if len(cache) > 50_000:
        cache.clear()
    wanted = {(keys.agents_key(i), g) for i, f in entries
              if (g := f[15] if len(f) == 20 else events.entry_fields(f).get(b"g"))}
    if missing := wanted - cache.keys():
        cache.update(await agent_texts(redis, missing))


async def read_seals(redis: aioredis.Redis, after: str, chunk: int = SEAL_CHUNK) -> AsyncIterator[Seal | Problem]:
    """Seals after id ``after`` ("" from the first), oldest first; a malformed one as a Problem."""
    cursor = f"({after}" if after else "-"
    while True:
        found = await seals_after(redis, cursor, chunk)
        for item in found:
            yield item
        if len(found) < chunk:
            return
        cursor = "(" + (item.id if isinstance(item, Seal) else item.seal or "")


async def seals_after(redis: aioredis.Redis, cursor: str, count: int) -> list[Seal | Problem]:
    """Up to ``count`` seals from ``cursor`` (an XRANGE start), oldest first; a malformed one as a Problem."""
    out: list[Seal | Problem] = []
    for entry_id, fields in await redis.xrange(keys.SEALS, cursor, "+", count=count):
        try:
            out.append(Seal.from_entry(entry_id, fields))
        except ValueError as e:
            out.append(Problem(SEAL_ALTERED, str(e), seal=entry_id.decode()))
    return out


async def find_marker(redis: aioredis.Redis) -> Seal | None:
    """The oldest seal when none of its events is left (retention's marker), else None."""
    first = await redis.xrange(keys.SEALS, "-", "+", count=1)
    if not first:
        return None
    try:
        seal = Seal.from_entry(*first[0])
    except ValueError:
        return None
    oldest = await redis.xrange(keys.AUDIT, "-", "+", count=1)
    return seal if not oldest or idkey(oldest[0][0].decode()) > idkey(seal.id) else None


async def newest_seal(redis: aioredis.Redis) -> Seal | None:
    """The newest well-formed seal, or None."""
    found = await redis.xrevrange(keys.SEALS, "+", "-", count=1)
    if not found:
        return None
    try:
        return Seal.from_entry(*found[0])
    except ValueError:
        return None


# -- the copy outside Redis ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OutsideSeal:
    """The newest seal as recorded outside Redis."""

    id: str
    total: int
    mac: bytes
    key: str
    path: str = ""

    @classmethod
    def of(cls, seal: Seal) -> OutsideSeal:
        return cls(seal.id, seal.total, seal.mac, seal.key)

    def to_json(self) -> dict[str, Any]:
        return {"seal": self.id, "events": self.total, "chain": self.mac.hex(), "key": self.key,
                "through": events.iso_ms(events.id_ms(self.id))}


class OutsideCopy:
    """``<data-dir>/audit-seal.json``: the newest seal this host has seen. Written whole (temporary file,
    fsync, rename, fsync of the directory), under a lock, and never replaced by an older seal, so
    several processes may share the data dir."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def read(self) -> OutsideSeal | None:
        """The recorded seal; None when there is no file; ValueError when it cannot be read."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ValueError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            obj = json.loads(raw)
            found = OutsideSeal(str(obj["seal"]), int(obj["events"]), bytes.fromhex(obj["chain"]), str(obj["key"]),
                                str(self.path))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path} is not a seal record") from None
        if not inputs.is_event_id(found.id) or len(found.mac) != 32:
            raise ValueError(f"{self.path} is not a seal record")
        return found

    def write(self, seal: Seal) -> bool:
        """Record ``seal`` unless the file already holds one as new or newer; True when written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.read()
            except ValueError:  # kept for whoever looks into it, not overwritten
                current = None
                os.replace(self.path, self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}"))
            if current is not None and current.total >= seal.total:
                return False
            text = json.dumps({**OutsideSeal.of(seal).to_json(),
                               "written": events.iso_ms(int(time.time() * 1000))}) + "\n"
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return True


async def check_outside(redis: aioredis.Redis, copy: OutsideSeal, newest: Seal | None,
                        marker: Seal | None) -> Problem | None:
    """Whether Redis still holds the seal recorded outside it, unchanged (or retention removed it since)."""
    where = f" ({copy.path})" if copy.path else ""
    recorded = f"seal {copy.id} ({copy.total} events, through {events.iso_ms(events.id_ms(copy.id))})"
    if newest is None:
        return Problem(CUT_OFF, f"the trail is shorter than the copy outside Redis{where} says: it records {recorded}, "
                                "and Redis holds no seal at all", seal=copy.id)
    if copy.total > newest.total:
        return Problem(CUT_OFF, f"the trail is shorter than the copy outside Redis{where} says: it records {recorded}; "
                                f"the newest seal in Redis is {newest.id} ({newest.total} events)", seal=copy.id)
    if marker is None:
        marker = await find_marker(redis)
    if marker is not None and idkey(copy.id) <= idkey(marker.id) and marker.total >= copy.total:
        return None  # retention has removed it since: the kept trail begins after it
    found = await redis.xrange(keys.SEALS, copy.id, copy.id)
    try:
        seal = Seal.from_entry(*found[0]) if found else None
    except ValueError:
        seal = None
    if seal is None:
        return Problem(CUT_OFF, f"{recorded}, recorded outside Redis{where}, is not in Redis any more: the trail was "
                                "cut off or replaced and sealed again", seal=copy.id)
    if seal.mac != copy.mac or seal.total != copy.total:
        return Problem(CUT_OFF, f"seal {copy.id} in Redis differs from the copy outside Redis{where}: the trail was "
                                "replaced and sealed again", seal=copy.id)
    return None


# -- verification ---------------------------------------------------------------------------------------

@dataclass
class Report:
    """What a verification found."""

    events: int = 0  # events checked against seals
    seals: int = 0
    removed: int = 0  # events before the kept trail (removed by retention), per the marker
    marker: Seal | None = None  # the kept trail begins after it
    verified: Seal | None = None  # the newest seal before the first problem
    newest: Seal | None = None
    unsealed: int = 0  # events after the newest seal
    unsealed_from: str | None = None  # the oldest of them
    outside: OutsideSeal | None = None
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0  # beyond the ones listed
    seconds: float = 0.0
    cpu: float = 0.0  # CPU seconds of this process
    notes: list[str] = field(default_factory=list)

    def add(self, problem: Problem, limit: int = 20) -> None:
        if len(self.problems) < limit:
            self.problems.append(problem)
        else:
            self.more_problems += 1

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        def seal_json(s: Seal | None) -> dict[str, Any] | None:
            return None if s is None else {"id": s.id, "events": s.total,
                                           "at": events.iso_ms(events.id_ms(s.id)), "chain": s.mac.hex()}
        return {"ok": self.ok, "events": self.events, "seals": self.seals, "removed_by_retention": self.removed,
                "verified_through": seal_json(self.verified), "newest_seal": seal_json(self.newest),
                "unsealed": self.unsealed, "unsealed_from": self.unsealed_from,
                "outside_copy": self.outside.to_json() if self.outside else None,
                "problems": [p.to_json() for p in self.problems], "more_problems": self.more_problems,
                "notes": self.notes}


async def verify_redis(redis: aioredis.Redis, keys_: SealKeys, *, now_ms: int, retention_days: int,
                       outside: OutsideSeal | None = None,
                       on_entries: Callable[[list[Any]], None] | None = None,
                       pace: Callable[[], Awaitable[None]] | None = None, chunk: int = EVENT_CHUNK) -> Report:
    """Recompute the chain from the oldest kept event against the seals in Redis and the outside copy.

    ``on_entries`` sees every raw event chunk (``audit verify`` checks the session stories in the same
    pass); ``pace`` is awaited after each piece of work (a few milliseconds: the background verifier
    sleeps there to bound its share of the CPU).
    """
    started, cpu0 = time.monotonic(), 0.0
    report = Report(outside=outside)
    first_seal = await redis.xrange(keys.SEALS, "-", "+", count=1)
    first_event = await redis.execute_command(b"XRANGE", keys.AUDIT, "-", "+", "COUNT", 1)
    head = START
    if first_seal:
        try:
            first: Seal | None = Seal.from_entry(*first_seal[0])
        except ValueError:
            first = None  # read_seals reports it
        oldest = first_event[0][0].decode() if first_event else None
        if first is not None and (oldest is None or idkey(oldest) > idkey(first.id)):
            # The oldest seal's events are gone: the marker retention leaves; the kept trail goes on from it.
            head = Head.of(first)
            report.marker, report.removed, report.newest = first, first.total, first
            if retention_days > 0 and events.id_ms(first.id) > now_ms - retention_days * 86_400_000:
                report.add(Problem(EARLY_TRIM, f"events up to {first.id} ({events.iso_ms(events.id_ms(first.id))}) "
                                               f"were removed before the {retention_days} days of retention were "
                                               "over", seal=first.id))
        elif first is not None and first.before > 0:
            head = Head.of(first)
            report.newest = first
            report.add(Problem(SEALS_MISSING, f"the seals before {first.id} are missing: events from {oldest} to "
                                              f"{first.id} are covered by no seal", event=oldest, seal=first.id))
    trail = Trail(redis, head.id, chunk=chunk, on_entries=on_entries, pace=pace)
    try:
        async for item in read_seals(redis, head.id):
            if isinstance(item, Problem):
                report.add(item)
                continue
            seal = item
            rows = await trail.through(seal.id)
            began = time.thread_time()
            problem = check_batch(keys_, head, seal, rows)
            if problem is not None and await _trimmed(redis, seal):
                problem = None  # retention removed this batch while the pass ran: not a problem
            if problem is not None and problem.kind == DELETED and problem.event is None:
                problem = await _name_deleted(redis, problem, rows, head, seal)
            worked = time.thread_time() - began
            cpu0 += worked
            if problem is not None:
                report.add(problem)
            elif report.ok:
                report.verified = seal
            head = Head.of(seal)
            report.seals += 1
            report.events += len(rows)
            report.newest = seal
            if pace:
                await pace()
        report.unsealed_from = await trail.first_left()
        if report.unsealed_from is not None:
            report.unsealed = max(1, await redis.xlen(keys.AUDIT) - report.events)
    finally:
        trail.close()
    if report.verified is None and report.ok and report.marker is not None:
        report.verified = report.marker
    if outside is not None:
        problem = await check_outside(redis, outside, report.newest, report.marker)
        if problem is not None:
            report.add(problem)
    report.seconds = time.monotonic() - started
    report.cpu = cpu0 + trail.cpu
    return report


async def _trimmed(redis: aioredis.Redis, seal: Seal) -> bool:
    """Whether retention has removed ``seal``'s batch since it was read: the marker is now at or after it."""
    marker = await find_marker(redis)
    return marker is not None and idkey(marker.id) >= idkey(seal.id)


async def _name_deleted(redis: aioredis.Redis, problem: Problem, rows: list[tuple[str, bytes]], head: Head,
                        seal: Seal) -> Problem:
    """A deleted event's id from the type indexes (written with it, under the same id), when they still name it."""
    present = {r[0] for r in rows}
    low = head.id or "-"
    async with redis.pipeline(transaction=False) as pipe:
        for kind in events.TYPES:
            pipe.xrange(keys.AUDIT_TYPE + kind, f"({low}" if head.id else "-", seal.id, count=BATCH_MAX + 1)
        replies = await pipe.execute()
    gone = sorted((idkey(i.decode()), i.decode(), kind) for kind, found in zip(events.TYPES, replies, strict=True)
                  for i, _ in found if i.decode() not in present)
    if not gone:
        return problem
    _, ident, kind = gone[0]
    return Problem(DELETED, f"event {ident} ({kind}) was deleted: seal {seal.id} includes it, and the {kind} "
                            "index still names it", event=ident, seal=seal.id)


# -- exports with seals, verified offline --------------------------------------------------------------------

async def with_seals(redis: aioredis.Redis, chunks: AsyncIterator[list[dict[str, Any]]], newest: Seal,
                     complete: bool) -> AsyncIterator[list[dict[str, Any]]]:
    """Interleave seal lines with exported rows (newest first, none newer than ``newest``): each seal
    right before the events it covers.

    ``complete`` (an unfiltered export): every seal from ``newest`` down, and after the oldest event
    the seal before its batch (where that batch's chain begins: the previous batch, or retention's
    marker). Otherwise only the seals that cover an exported event, each checked on its own.
    """
    cursor = newest.id
    buffer: list[Seal] = []
    exhausted = False

    async def peek() -> Seal | None:
        nonlocal cursor, exhausted
        while not buffer and not exhausted:
            found = await redis.xrevrange(keys.SEALS, cursor, "-", count=SEAL_CHUNK)
            exhausted = len(found) < SEAL_CHUNK
            if found:
                cursor = "(" + found[-1][0].decode()
            for entry_id, fields in found:
                with contextlib.suppress(ValueError):
                    buffer.append(Seal.from_entry(entry_id, fields))
        return buffer[0] if buffer else None

    async for chunk in chunks:
        out: list[dict[str, Any]] = []
        for row in chunk:
            key = idkey(row["id"])
            covering = None
            while (s := await peek()) is not None and idkey(s.id) >= key:
                covering = buffer.pop(0)
                if complete:
                    out.append(covering.to_json())
            if covering is not None and not complete:
                out.append(covering.to_json())
            out.append(row)
        yield out
    if complete:
        tail = []
        while await peek() is not None:
            tail.append(buffer.pop(0).to_json())
        if tail:
            yield tail


EXPORT_HEADER = "sessionaudit_export"  # key of the first line of an export with seals


def export_header(filters: dict[str, str]) -> dict[str, Any]:
    """The first line of ``.ndjson?seals=1``: what was exported (an export filtered in any way cannot be
    checked for completeness, only event by event)."""
    return {EXPORT_HEADER: 1, "filters": filters, "seal_digest_bytes": DIGEST_BYTES}


def verify_export(lines: Iterable[bytes], keys_: SealKeys, name: str = "the export") -> Report:
    """Check an ``.ndjson?seals=1`` export (newest first, each seal line before the events it covers)
    offline, with the key: the same checks as in Redis, batch by batch from the newest."""
    started, cpu0 = time.monotonic(), time.process_time()
    report = Report()
    complete: bool | None = None  # unfiltered: every event between the seals must be there
    current: Seal | None = None  # the seal whose events the lines now are
    batch: list[tuple[str, bytes]] = []  # its events, newest first
    last_id: tuple[int, int] | None = None

    def finish(seal: Seal, rows: list[tuple[str, bytes]], older: Seal | None) -> None:
        rows.reverse()
        if complete and older is None and not rows:  # the oldest seal, its events gone: the kept trail's start
            report.marker, report.removed = seal, seal.total
            return
        report.seals += 1
        report.events += len(rows)
        if not complete:
            problem = _check_each(keys_, seal, rows)
        elif older is None and seal.before > 0:
            problem = Problem(SEALS_MISSING, f"the seal before {seal.id} is not in {name}: the events of seal "
                                             f"{seal.id} cannot be checked", seal=seal.id)
        else:
            problem = check_batch(keys_, Head.of(older) if older else START, seal, rows)
        if problem is not None:
            report.add(problem)

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            report.add(Problem(ALTERED, f"line {number} of {name} is not a JSON object"))
            continue
        if complete is None:
            if EXPORT_HEADER not in obj:
                report.add(Problem(SEALS_MISSING, f"{name} carries no seals: export it with them "
                                                  "(/admin/audit.ndjson?seals=1)"))
                break
            complete = not obj.get("filters")
            if not complete:
                report.notes.append("a filtered export: each event is checked against its seal; whether events are "
                                    "missing cannot be told")
            continue
        if "seal" in obj:
            try:
                seal = Seal.from_json(obj)
            except ValueError as e:
                report.add(Problem(SEAL_ALTERED, f"line {number}: {e}"))
                continue
            if current is not None:
                finish(current, batch, seal)
            elif report.newest is None:
                report.newest = seal
            current, batch = seal, []
            continue
        ident = obj.get("id")
        if not isinstance(ident, str) or not inputs.is_event_id(ident):
            report.add(Problem(ALTERED, f"line {number} of {name} is neither an event nor a seal"))
            continue
        key = idkey(ident)
        if last_id is not None and key >= last_id:
            report.add(Problem(REORDERED, f"event {ident} (line {number}) is out of order: an export lists the "
                                          "newest first", event=ident))
        last_id = key
        if current is None:  # an export with seals ends at its newest seal: nothing comes before it
            report.unsealed += 1
            report.add(Problem(SEALS_MISSING, f"event {ident} (line {number}) is covered by no seal in {name}",
                               event=ident))
        elif key > idkey(current.id):
            report.add(Problem(INSERTED, f"event {ident} (line {number}) was inserted: no seal covers it", event=ident))
        else:
            batch.append((ident, canonical(obj)))
    if complete is None and not report.problems:
        report.add(Problem(SEALS_MISSING, f"{name} is empty"))
    if current is not None:
        finish(current, batch, None)
    if report.ok:
        report.verified = report.newest
    report.seconds = time.monotonic() - started
    report.cpu = time.process_time() - cpu0
    return report


def _check_each(keys_: SealKeys, seal: Seal, rows: list[tuple[str, bytes]]) -> Problem | None:
    """Each event of a filtered export against the digests of its seal (membership; no chain)."""
    mac = keys_.mac(seal.key)
    if mac is None:
        return Problem(NO_KEY, f"seal {seal.id} was made with key {seal.key}, which is not configured here",
                       seal=seal.id)
    sealed = set(seal.digest_list())
    for ident, c in rows:
        if mac(c)[:DIGEST_BYTES] not in sealed:
            return Problem(ALTERED, f"event {ident} was altered: it does not match its seal{_which(seal, ident)}",
                           event=ident, seal=seal.id)
    return None


def read_lines(path: str) -> Iterator[bytes]:
    """An export's lines, streamed."""
    with open(path, "rb") as f:
        yield from f


# -- the background service of each process ---------------------------------------------------------

@dataclass
class SealStatus:
    """What this process knows about the trail's seals: what the admin pages and the metrics show."""

    state: str = "pending"  # pending (no whole pass finished yet), ok, failed
    running: bool = False  # the background verifier runs in this process
    verified_id: str | None = None  # the newest seal verified
    verified_events: int = 0
    problem: Problem | None = None
    unsealed_since: int | None = None  # ms: the oldest event unsealed for longer than UNSEALED_GRACE_MS
    passes: int = 0
    pass_seconds: float | None = None
    pass_cpu: float | None = None
    last_pass_at: float | None = None  # clock seconds
    started_at: float | None = None

    @property
    def verified_at(self) -> int | None:
        return events.id_ms(self.verified_id) if self.verified_id else None


class SealService:
    """Each process: seals new events while it holds the lease, verifies new seals as they come and
    the whole kept trail pass after pass (bounded CPU), keeps the copy outside Redis, reports.

    Runs on the IOLoop: every piece of work is a few milliseconds, with awaits in between, and a
    background pass sleeps between pieces to stay within ``share`` of a core (``busy_share`` while
    requests are in flight), so pages never wait long for it.
    """

    def __init__(self, redis: aioredis.Redis, seal_keys: SealKeys, clock: Callable[[], float], *,
                 retention_days: int = 365, outside: OutsideCopy | None = None,
                 busy: Callable[[], bool] = lambda: False, metrics: Any = None, interval: float = 0.5,
                 lease: float = 5.0, pause_max: float = 5.0, share: float = 0.25, busy_share: float = 0.05):
        self.redis = redis
        self.keys = seal_keys
        self.clock = clock
        self.retention_days = retention_days
        self.outside = outside
        self.busy = busy
        self.metrics = metrics
        self.interval = interval
        self.lease_ms = int(lease * 1000)
        self.pause_max = pause_max
        self.share = share
        self.busy_share = busy_share
        self.status = SealStatus()
        self.token = secrets.token_urlsafe(12)
        self.holding = False
        self.behind = False  # the sealer's last round left a backlog: background passes step back
        self.head: Head | None = None  # the sealer's: where its next seal chains from
        self.followed: Seal | None = None  # the newest seal this process has verified (or started from)
        self._scripts = keys.Scripts(redis, lease=LEASE, release=RELEASE, seal=SEAL)
        self._agents: dict[tuple[str, bytes], str | None] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._last_log = 0.0
        self._logged: Seal | None = None
        self._newest_sealed: Seal | None = None
        self._renewed = 0.0
        self._seal_loaded = False
        self._write_failing = False
        self._errors: dict[str, tuple[str, float]] = {}
        self._paced = 0.0
        self._written: Seal | None = None
        self._follow_problem: Problem | None = None
        self._failing: dict[str, bool] = {}
        self._error_logged: tuple[str, float] | None = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- sealing ---------------------------------------------------------------------------

    async def seal_once(self) -> int:
        """Take or renew the lease; while held, seal every event not sealed yet. Returns how many."""
        if not self.keys.current:
            return 0
        self.behind = False
        newest_event = await self._renew()
        if newest_event is None:
            if self.holding:
                log.info("another process seals the audit trail now")
            self.holding = False
            return 0
        if not self.holding or self.head is None:
            newest = await newest_seal(self.redis)
            self.head = Head.of(newest) if newest else START
            self.holding = True
            log.info("this process seals the audit trail, continuing after %s",
                     f"seal {self.head.id} ({self.head.total} events)" if self.head.id else "the start")
        if not newest_event or (self.head.id and idkey(newest_event) <= idkey(self.head.id)):
            return 0  # nothing new
        sealed, moved = 0, False
        name = self.keys.current
        mac = self.keys.mac(name)
        assert mac is not None
        script = self._scripts.seal
        ahead: asyncio.Task[Any] | None = None  # the next chunk, read while this one is sealed
        try:
            while True:
                entries = await (ahead or self._read_after(self.head.id))
                ahead = None
                if not entries:
                    break
                full = len(entries) == READ_BATCHES * BATCH_MAX
                if full:  # more to come: read it meanwhile (round trips, not CPU, bound this under load)
                    ahead = asyncio.get_running_loop().create_task(self._read_after(entries[-1][0].decode()))
                await fill_agents(self.redis, entries, self._agents)
                fulls: list[bytes] = []
                worked = 0.0
                for k in range(0, len(entries), SLICE):
                    began = time.thread_time()
                    fulls.extend(mac(canonical(exported(i, f, self._agents))) for i, f in entries[k:k + SLICE])
                    worked += time.thread_time() - began
                    await asyncio.sleep(0)  # requests get their turn between slices
                made: list[tuple[Head, Seal]] = []
                prev = self.head
                for k in range(0, len(entries), BATCH_MAX):
                    last = entries[min(k + BATCH_MAX, len(entries)) - 1][0].decode()
                    seal = make_seal(mac, name, prev, last, fulls[k:k + BATCH_MAX])
                    made.append((prev, seal))
                    prev = Head.of(seal)
                # One round trip for all of them; each is refused unless the one before it went in.
                if not self._seal_loaded:
                    await self.redis.script_load(script.source)
                    self._seal_loaded = True
                # With --redis-wait-replicas, a seal counts (and reaches the copy outside Redis) only once
                # the replicas hold it: a failover must not leave the outside copy ahead of the trail.
                wait = redisconn.wait_of(self.redis)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for before, seal in made:
                        pipe.execute_command("EVALSHA", script.sha, 0, self.now_ms(), self.token, before.id, seal.id,
                                             seal.key, seal.total, seal.mac, seal.digests)
                    if wait:
                        pipe.execute_command("WAIT", *wait)
                    results = await pipe.execute(raise_on_error=False)
                if wait and not (isinstance(acked := results.pop(), int) and acked >= wait[0]):
                    raise redisconn.NotReplicated(f"{acked} of {wait[0]} replica(s) confirmed the seals in time")
                for (before, seal), result in zip(made, results, strict=True):
                    if result != b"ok":
                        break
                    self.head = Head.of(seal)
                    sealed += seal.count
                    self._sealed(before, seal)
                else:
                    self.behind = full
                    if not full:
                        break
                    if sealed >= CATCH_UP and self.busy():
                        await asyncio.sleep(worked)  # a long backlog while pages are served: half the CPU each
                    if time.monotonic() - self._renewed > self.lease_ms / 3000 and await self._renew() is None:
                        self.holding, self.head = False, None
                        break
                    continue
                if ahead is not None:
                    ahead.cancel()
                    ahead = None
                if isinstance(result, redis.exceptions.NoScriptError):  # the scripts were flushed
                    self._seal_loaded = False
                    break
                if isinstance(result, Exception):
                    raise result
                if result == b"moved" and not moved:  # the newest seal is not the one this process wrote last
                    newest = await newest_seal(self.redis)
                    log.warning("sealing: the newest seal in Redis is %s, not %s, which this process wrote: going "
                                "on from it", newest.id if newest else "none", self.head.id or "none")
                    self.head, moved = Head.of(newest) if newest else START, True
                    continue
                log.info("sealing: the lease passed to another process")
                self.holding, self.head = False, None
                break
        finally:
            if ahead is not None:
                ahead.cancel()
            self.behind = False
        return sealed

    async def _read_after(self, after: str) -> Any:
        """Raw entries after id ``after`` ("" from the start), a round's worth."""
        return await self.redis.execute_command(b"XRANGE", keys.AUDIT, f"({after}" if after else "-", "+", "COUNT",
                                                READ_BATCHES * BATCH_MAX)

    async def _renew(self) -> str | None:
        """Take or renew the lease: the newest event's id ('' for none), or None when another process holds it."""
        got = await self._scripts.lease(args=[self.now_ms(), self.token, self.lease_ms])
        if got == 0:
            return None
        self._renewed = time.monotonic()
        return got.decode()

    def _sealed(self, prev: Head, seal: Seal) -> None:
        self._newest_sealed = seal
        if self.metrics is not None:
            self.metrics.sealed(seal.count)
        if self.followed is not None and self.followed.id == prev.id and self.followed.mac == prev.mac:
            self._advance(seal)
        self.log_seal()

    def log_seal(self, now: bool = False) -> None:
        """The newest seal this process wrote, in the log: a copy outside Redis that log shipping takes off
        the host. At most every SEAL_LOG_EVERY seconds (and at shutdown), so it trails by that much at most."""
        seal = self._newest_sealed
        if seal is None or seal is self._logged or (not now and time.monotonic() - self._last_log < SEAL_LOG_EVERY):
            return
        self._last_log = time.monotonic()
        self._logged = seal
        record = OutsideSeal.of(seal).to_json()
        log.info("audit sealed through %s (%s): %d events, chain %s, key %s", seal.id, record["through"], seal.total,
                 record["chain"], seal.key, extra={"seal": record})

    async def release(self) -> None:
        """Give the lease up (shutdown): another process takes over at once."""
        if self.holding:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._scripts.release(args=[self.token])
            self.holding = False
        self.log_seal(now=True)

    # -- following new seals ------------------------------------------------------------------

    async def follow_once(self) -> None:
        """Verify the seals written since the last look; note unsealed events; update the outside copy."""
        if self.followed is None:  # the first look: go on from the newest seal (a whole pass checks the rest)
            self.followed = await newest_seal(self.redis)
            if self.followed is not None:
                self._advance(self.followed)
        while True:
            base = self.followed
            found = await seals_after(self.redis, base.id if base else "-", 17)
            if base is not None:  # the seal it goes on from must still be there, unchanged
                again = found.pop(0) if found and isinstance(found[0], Seal) and found[0].id == base.id else None
                if again is None or again.mac != base.mac or again.total != base.total:
                    self._follow_failed(Problem(
                        CUT_OFF, f"seal {base.id} ({base.total} events), which this process verified, is "
                                 f"{'no longer in Redis' if again is None else 'different now'}: the trail was cut "
                                 "off or replaced and sealed again", seal=base.id))
                    self.followed = await newest_seal(self.redis)
                    break
            for item in found:
                if isinstance(item, Problem):
                    self._follow_failed(item)
                    continue
                prev = Head.of(self.followed) if self.followed else START
                start = f"({prev.id}" if prev.id else "-"
                entries = await self.redis.execute_command(b"XRANGE", keys.AUDIT, start, item.id, "COUNT",
                                                           2 * BATCH_MAX)
                await fill_agents(self.redis, entries, self._agents)
                began = time.thread_time()
                rows = await canonical_rows(entries, self._agents)
                problem = check_batch(self.keys, prev, item, rows)
                worked = time.thread_time() - began
                if problem is not None:
                    if problem.kind == DELETED and problem.event is None:
                        problem = await _name_deleted(self.redis, problem, rows, prev, item)
                    self._follow_failed(problem)
                self._advance(item)
                await asyncio.sleep(worked)  # at most half the CPU when far behind
            if len(found) < 16:
                break
        await self._check_tail()
        await self._keep_outside_copy()

    def _advance(self, seal: Seal) -> None:
        self.followed = seal
        if self.status.problem is None or self.status.state == "pending":
            self.status.verified_id = seal.id
            self.status.verified_events = seal.total
        self._report()

    def _follow_failed(self, problem: Problem) -> None:
        if self._follow_problem is None:
            self._follow_problem = problem
        self._fail(problem)

    async def _check_tail(self) -> None:
        """Events left unsealed longer than the grace: sealing is not keeping up (or no process seals)."""
        after = self.followed.id if self.followed else ""
        found = await self.redis.execute_command(b"XRANGE", keys.AUDIT, f"({after}" if after else "-", "+",
                                                 "COUNT", 1)
        oldest = events.id_ms(found[0][0].decode()) if found else None
        behind = oldest is not None and self.now_ms() - oldest > UNSEALED_GRACE_MS
        if behind and self.status.unsealed_since is None:
            log.warning("audit events since %s are not sealed yet: is a process sealing (the lease holder)?",
                        events.iso_ms(oldest))  # type: ignore[arg-type]
        elif not behind and self.status.unsealed_since is not None:
            log.info("audit sealing has caught up")
        self.status.unsealed_since = oldest if behind else None
        if self.metrics is not None:
            self.metrics.unsealed((self.now_ms() - oldest) / 1000 if oldest is not None else 0.0)

    async def _keep_outside_copy(self) -> None:
        if self.outside is None or self.followed is None or self.followed is self._written:
            return
        try:
            recorded = await asyncio.to_thread(self.outside.read)
        except ValueError as e:
            recorded = None
            log.warning("%s: it is kept beside it (.unreadable-<time>) and a new one written", e)
        if recorded is not None:
            problem = await check_outside(self.redis, recorded, self.followed, None)
            if problem is not None:
                self._fail(problem)
                return  # the file is evidence: never overwritten by a chain that does not extend it
            if recorded.total >= self.followed.total:
                self._written = self.followed
                return
        try:
            await asyncio.to_thread(self.outside.write, self.followed)
        except OSError as e:
            if not self._write_failing:
                log.error("cannot write the copy of the newest seal to %s (%s): a trail cut off together with its "
                          "seals would not be noticed", self.outside.path, e.strerror or e)
                self._write_failing = True
            return
        if self._write_failing:
            log.warning("the copy of the newest seal is written to %s again", self.outside.path)
            self._write_failing = False
        self._written = self.followed

    # -- whole passes -----------------------------------------------------------------------------

    async def full_pass(self) -> Report:
        """Verify the whole kept trail once (bounded CPU) and update the status."""
        started_at = self.clock()
        follow_problem_before = self._follow_problem
        recorded = None
        if self.outside is not None:
            try:
                recorded = await asyncio.to_thread(self.outside.read)
            except ValueError as e:
                log.warning("%s", e)
        cpu = self._paced = time.thread_time()
        report = await verify_redis(self.redis, self.keys, now_ms=self.now_ms(), retention_days=self.retention_days,
                                    outside=recorded, pace=self._pace, chunk=SLICE)
        cpu = time.thread_time() - cpu  # the IOLoop thread's: the pass's own when nothing else ran meanwhile
        status = self.status
        status.passes += 1
        status.pass_seconds, status.pass_cpu, status.last_pass_at = report.seconds, cpu, started_at
        if self.metrics is not None:
            self.metrics.verify_pass(report.seconds, cpu, report.events)
        # A problem that following found during this pass still stands; one found before it was re-checked,
        # except a seal this process had verified that is gone: only this process saw it.
        if self._follow_problem is follow_problem_before and (
                self._follow_problem is None or self._follow_problem.kind != CUT_OFF):
            self._follow_problem = None
        if report.problems:
            status.verified_id = report.verified.id if report.verified else None
            status.verified_events = report.verified.total if report.verified else 0
            self._fail(report.problems[0], first=True)
        elif self._follow_problem is not None:
            self._fail(self._follow_problem)
        else:
            was = status.state
            status.state, status.problem = "ok", None
            if was == "failed":
                log.warning("the audit trail verifies again")
            newest = self.followed if self.followed and report.verified and \
                idkey(self.followed.id) > idkey(report.verified.id) else report.verified
            status.verified_id = newest.id if newest else None
            status.verified_events = newest.total if newest else 0
        if self.followed is None and report.newest is not None:
            self.followed = report.newest
        self._report()
        return report

    async def _pace(self) -> None:
        """Sleep so that a pass stays within its share of a core (less while requests are in flight).

        What it used is the IOLoop thread's CPU since the last sleep: the pass's reading and parsing
        as well as its hashing (and whatever else ran meanwhile, which only makes it slower)."""
        worked = time.thread_time() - self._paced
        share = self.busy_share if self.busy() or self.behind else self.share
        await asyncio.sleep(max(0.0, worked) * (1 / share - 1))
        self._paced = time.thread_time()

    def _fail(self, problem: Problem, first: bool = False) -> None:
        """Note a problem: the status names the first one found (``first``: the oldest in the trail)."""
        status = self.status
        if first or status.problem is None or status.state != "failed":
            status.problem = problem
        status.state = "failed"
        now = time.monotonic()
        last = self._error_logged
        if last is None or last[0] != status.problem.message or now - last[1] > 600:
            log.error("audit trail verification FAILED: %s", status.problem.message,
                      extra={"seal_problem": status.problem.to_json()})
            self._error_logged = (status.problem.message, now)
        self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            at = self.status.verified_at
            self.metrics.seal_status(self.status.state == "failed", at / 1000 if at else None)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start sealing (when this process gets the lease), following and whole passes."""
        loop = asyncio.get_running_loop()
        self.status.running = True
        self.status.started_at = self.clock()
        self._tasks = [
            loop.create_task(self._loop("sealing", self._seal_step, self._seal_period, every=True)),
            loop.create_task(self._loop("following", self.follow_once, lambda: 1.0, every=True)),
            loop.create_task(self._loop("verifying", self.full_pass, self._pause)),
        ]

    async def _seal_step(self) -> None:
        await self.seal_once()
        self.log_seal()

    def _seal_period(self) -> float:
        """Seconds from one sealing round to the next: ``interval`` while this process seals (so an event
        waits that long at most), else a try for the lease a second."""
        return self.interval if self.holding else max(self.interval, 1.0)

    def _pause(self) -> float:
        """Seconds between whole passes (new seals are checked as they come meanwhile)."""
        return self.pause_max

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.release()
        self.status.running = False

    async def _loop(self, what: str, step: Callable[[], Awaitable[Any]], pause: Callable[[], float],
                    every: bool = False) -> None:
        """Run ``step`` until stopped, ``pause()`` seconds apart (``every``: from one start to the next)."""
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                await step()
                if self._failing.pop(what, False):
                    log.warning("audit %s: Redis is reachable again", what)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                if not self._failing.get(what):
                    log.warning("audit %s: Redis unreachable (%s); retrying", what, e)
                    self._failing[what] = True
                self.holding = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug, or Redis refusing: logged once a minute, not at every round
                last = self._errors.get(what)
                if last is None or last[0] != repr(e) or time.monotonic() - last[1] > 60:
                    log.exception("audit %s failed; retrying", what)
                    self._errors[what] = (repr(e), time.monotonic())
            wait = pause() - (time.monotonic() - began if every else 0.0)
            try:
                await asyncio.wait_for(self._stopping.wait(), max(0.01, wait))
            except TimeoutError:
                pass


def outside_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / OUTSIDE_NAME

