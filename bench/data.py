"""Bulk data in the site's exact formats: users, audit events (through the site's own ``emit``) and
live sessions (through the site's LOGIN script), written with pipelined EVALSHA calls.
"""

from __future__ import annotations

import base64
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import argon2
import common  # noqa: F401 (puts site/ on sys.path before sessionaudit is imported)
import redis

from sessionaudit import keys, sessions, users
from sessionaudit.config import Settings

# Many events per call, through the site's own emit(): the same ids, fields, indexes and counters
# as the site writes. ARGV: n, then per event: now, t, a, u, e, s, i, g, r, c ('' = absent).
LOADER = r"""
local n = tonumber(ARGV[1])
local last = ''
local function opt(x) if x == '' then return nil end return x end
for k = 0, n - 1 do
  local b = 1 + k * 10
  last = emit(tonumber(ARGV[b + 1]), {t = ARGV[b + 2], a = opt(ARGV[b + 3]), u = opt(ARGV[b + 4]),
    e = opt(ARGV[b + 5]), s = opt(ARGV[b + 6]), i = opt(ARGV[b + 7]), g = opt(ARGV[b + 8]),
    r = opt(ARGV[b + 9]), c = opt(ARGV[b + 10])})
end
return last
"""

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/6",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0 (X11; Ubuntu; Linux x86_64) Gecko/2010",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 Mobile",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Edg/124.0.0",
    "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/123.0.0.0 Safari",
]
FIRST = ["ana", "ben", "chloe", "dmitri", "elif", "farah", "gus", "hana", "ivan", "jun", "kofi", "lena", "mateo",
         "nora", "omar", "priya", "quinn", "rosa", "sven", "tara"]
DOMAINS = ["example.com", "example.org", "mail.example.net", "corp.example.io"]


def default_hasher() -> argon2.PasswordHasher:
    """argon2id with the site's default costs (config.Settings)."""
    s = Settings()
    return argon2.PasswordHasher(time_cost=s.argon2_time_cost, memory_cost=s.argon2_memory_cost,
                                 parallelism=s.argon2_parallelism, type=argon2.Type.ID)


def email_of(uid: int) -> str:
    return f"{FIRST[uid % len(FIRST)]}.{uid:04d}@{DOMAINS[uid % len(DOMAINS)]}"


def ref_of(rng: random.Random) -> str:
    """A session ref as the site makes them: 128 bits, URL-safe base64, 22 characters."""
    return base64.urlsafe_b64encode(rng.getrandbits(128).to_bytes(16, "big")).decode().rstrip("=")


def ip_of(rng: random.Random) -> str:
    return f"{rng.choice((10, 81, 92, 172, 203))}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def write_users(client: redis.Redis, count: int, password_hash: str, created_ms: int) -> None:
    """Accounts ``1..count`` written directly in the REGISTER script's format, without events (so a
    benchmark's event count is exactly what it loads)."""
    with client.pipeline(transaction=False) as pipe:
        for uid in range(1, count + 1):
            email = email_of(uid)
            pipe.hset(keys.USER + str(uid), mapping={"id": uid, "email": email, "hash": password_hash, "admin": "0",
                                                     "created": created_ms, "disabled": "0"})
            pipe.hset(keys.EMAILS, email, uid)
        pipe.set(keys.USER_NEXT, count)
        pipe.execute()


def register_users(client: redis.Redis, emails: list[str], password_hash: str, admin: bool = False) -> list[str]:
    """Accounts through the site's REGISTER script (each with its `register` event)."""
    script = client.register_script(keys.LUA_PRELUDE + users.REGISTER)
    now = int(time.time() * 1000)
    with client.pipeline(transaction=False) as pipe:
        for email in emails:
            script(args=[now, email, password_hash, "1" if admin else "0", "127.0.0.1", "bench"], client=pipe)
        return [u.decode() for u in pipe.execute()]


@dataclass
class EventSpec:
    hot_uid: int  # every 20th new event is this user's: a full page at any size
    users: int = 1000


def generate_events(n: int, end_ms: int, spacing_ms: int, spec: EventSpec, seed: int = 7) -> Iterator[list[object]]:
    """Realistic events, oldest first, as LOADER argument groups of 10 (without the leading n)."""
    rng = random.Random(seed)
    open_sessions: list[tuple[str, int, str, str]] = []  # ref, uid, ip, ua
    now = end_ms - n * spacing_ms
    for k in range(n):
        now += spacing_ms
        uid = spec.hot_uid if k % 20 == 0 else rng.randrange(1, spec.users + 1)
        roll = rng.random()
        if roll < 0.33 and open_sessions:
            i = rng.randrange(len(open_sessions))
            open_sessions[i], open_sessions[-1] = open_sessions[-1], open_sessions[i]
            ref, suid, ip, ua = open_sessions.pop()
            end = rng.random()
            if end < 0.45:
                yield [now, "expired", now - rng.randrange(1, 900), suid, email_of(suid), ref, "", "",
                       "idle" if rng.random() < 0.8 else "lifetime", ""]
            elif end < 0.85:
                yield [now, "logout", "", suid, email_of(suid), ref, ip, ua, "", ""]
            else:
                by_admin = rng.random() < 0.3
                yield [now, "revoked", "", suid, email_of(suid), ref, ip, ua, "admin" if by_admin else "user",
                       email_of(1) if by_admin else email_of(suid)]
        elif roll < 0.70:
            ref, ip, ua = ref_of(rng), ip_of(rng), rng.choice(USER_AGENTS)
            if len(open_sessions) < 20000:
                open_sessions.append((ref, uid, ip, ua))
            yield [now, "login", "", uid, email_of(uid), ref, ip, ua, "", ""]
        elif roll < 0.95:
            if rng.random() < 0.15:  # an unknown address
                yield [now, "login_failed", "", "", f"nobody{rng.randrange(10**6)}@example.com", "", ip_of(rng),
                       rng.choice(USER_AGENTS), "bad_credentials", ""]
            else:
                yield [now, "login_failed", "", uid, email_of(uid), "", ip_of(rng), rng.choice(USER_AGENTS),
                       "bad_credentials" if rng.random() < 0.9 else "throttled", ""]
        elif roll < 0.97:
            yield [now, "locked_out", "", uid, email_of(uid), "", ip_of(rng), rng.choice(USER_AGENTS), "account", ""]
        else:
            yield [now, "register", "", uid, email_of(uid), "", ip_of(rng), rng.choice(USER_AGENTS), "", ""]


def load_events(client: redis.Redis, n: int, spec: EventSpec, end_ms: int, spacing_ms: int = 2500,
                per_call: int = 1000, calls_per_pipe: int = 4,
                calls: list[tuple[float, str, int]] | None = None) -> float:
    """Append ``n`` events through ``emit``; return the seconds it took."""
    return load_stream(client, generate_events(n, end_ms, spacing_ms, spec), per_call, calls_per_pipe, calls)


def load_stream(client: redis.Redis, events: Iterable[list[object]], per_call: int = 1000,
                calls_per_pipe: int = 4, calls: list[tuple[float, str, int]] | None = None) -> float:
    """Append ``events`` (LOADER argument groups, oldest first) through ``emit``; return the seconds
    it took. Generation runs in a thread so Python's work overlaps Redis's. ``calls`` receives, per
    call, about when it began (monotonic), the id of its last event and its number of events (the
    seal lag of bench row 9)."""
    script = client.register_script(keys.LUA_PRELUDE + LOADER)
    batches: queue.Queue[list[object] | None] = queue.Queue(maxsize=8)

    def produce() -> None:
        group: list[object] = []
        count = 0
        for event in events:
            group.extend(event)
            count += 1
            if count == per_call:
                batches.put([count, *group])
                group, count = [], 0
        if count:
            batches.put([count, *group])
        batches.put(None)

    start = time.perf_counter()
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    done = False
    while not done:
        with client.pipeline(transaction=False) as pipe:
            queued = 0
            sizes = []
            while queued < calls_per_pipe:
                batch = batches.get()
                if batch is None:
                    done = True
                    break
                script(args=batch, client=pipe)
                sizes.append(batch[0])
                queued += 1
            if queued:
                sent = time.monotonic()
                replies = pipe.execute()
                took = time.monotonic() - sent
                if calls is not None:  # call k began about k parts of the pipeline's time in
                    calls.extend((sent + took * k / queued, last.decode(), size)
                                 for k, (last, size) in enumerate(zip(replies, sizes, strict=True)))
    thread.join()
    return time.perf_counter() - start


def create_sessions(client: redis.Redis, count: int, user_count: int, deadline_ms: list[int] | int,
                    rng: random.Random, lifetime_ms: int = 43_200_000, slack_ms: int = 60_000,
                    per_pipe: int = 1000) -> list[str]:
    """Live sessions through the site's LOGIN script (each with its `login` event), with their
    deadlines placed where asked: idle = deadline - now. Returns their refs."""
    script = client.register_script(keys.LUA_PRELUDE + sessions.LOGIN)
    refs: list[str] = []
    for base in range(0, count, per_pipe):
        with client.pipeline(transaction=False) as pipe:
            now = int(time.time() * 1000)
            for k in range(base, min(count, base + per_pipe)):
                ref = ref_of(rng)
                refs.append(ref)
                uid = 1 + k % user_count
                deadline = deadline_ms if isinstance(deadline_ms, int) else deadline_ms[k]
                ip, agent = ip_of(rng), USER_AGENTS[k % len(USER_AGENTS)]
                script(args=[now, ref, uid, max(1, deadline - now), lifetime_ms, slack_ms, ip, agent, "", "", "",
                             email_of(uid), "password", "", sessions.pair(ip, agent)], client=pipe)
            replies = pipe.execute()
            if not all(replies):
                raise RuntimeError("LOGIN refused a bench session (missing user?)")
    return refs
