"""Measurement 9 (issue 15): a flood of refused logins. Redis memory per refused attempt, /account
latency for another user while one client process floods, and the user-agent dictionaries after a
retention trim.

One site on its own Redis with three accounts: one flooded for the memory figure, one for the
latency figure, and the other user whose /account page is timed. Each flooded account is throttled
first by ``login_account_threshold`` wrong passwords (POST /login, default argon2), then flooded by
``loadgen.py flood``: POST /login with the _xsrf cookie and field, a wrong password and a new 2 KB
User-Agent each time (the site keeps its first 512 bytes, where they differ).

Memory: ``used_memory`` before the first refused attempt and after ``flood_attempts`` of them (one
connection: the issue's one client), then again once the sweeper has recorded the summary of the
last window; ``MEMORY USAGE`` of every key says where the bytes went, and the new events are read
back (their counts must add up to the attempts refused). Latency: /account paced at a quarter of its
capacity, calm and while the flood runs on ``flood_conns`` connections, interleaved rounds; the
flooded account is pushed to its longest backoff first, so the rounds see refused attempts only.

Dictionaries: a separate Redis gets a trail over ``trail_days`` days (through the site's ``emit``,
with past times, so each day's user agents go to that day's ``audit:ua:<day>``), every event with a
new 512-byte user agent; then ``server.py audit trim`` runs with a retention of ``trail_keep_days``.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections import Counter
from typing import Any

import data
import redis
import sealing
from common import (
    PASSWORD,
    PY,
    ROOT,
    Response,
    Site,
    browser_cookie,
    log,
    login,
    median,
    ratio,
    request,
    site_env,
    wait_quiet,
    xsrf_token,
)
from load import paced_rounds

from sessionaudit import events, keys
from sessionaudit.config import Settings

MEMORY_EMAIL = "flood.memory@example.com"
LOAD_EMAIL = "flood.load@example.com"
OTHER_EMAIL = "flood.bystander@example.com"
WRONG = "not the password 0000"
DAY_MS = 86_400_000
SETTLE_S = 3.0  # Redis shrinks the buffers of a connection idle for 2 s


class Flood:
    def __init__(self, bench: Any):
        self.b = bench
        self.site: Site | None = None
        self.cookie = ""
        self.settings = Settings()

    def start(self) -> None:
        b = self.b
        log("flood: starting the site")
        self.site = Site(b.children, "flood").start()
        password_hash = data.default_hasher().hash(PASSWORD)
        data.register_users(self.site.redis, [MEMORY_EMAIL, LOAD_EMAIL, OTHER_EMAIL], password_hash)
        sid, _ = login(self.site.port, OTHER_EMAIL)
        self.cookie = browser_cookie(self.site.port, "/account", sid)

    def close(self) -> None:
        if self.site is not None:
            self.site.close()
            self.site = None

    def _throttle(self, email: str) -> None:
        """Wrong passwords until the account is throttled (the next attempt is refused)."""
        assert self.site is not None
        xsrf = xsrf_token(self.site.port)
        for _ in range(self.settings.login_account_threshold):
            resp = _post_login(self.site.port, email, WRONG, xsrf)
            if resp.status != 401:
                raise RuntimeError(f"a wrong password for {email} answered {resp.status}, not 401")

    # -- memory per refused attempt ------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        assert self.site is not None
        b = self.b
        site, client = self.site, self.site.redis
        n = b.opts.flood_attempts
        # Warm-up on the other account, its summary recorded by the sweeper, and one snapshot: every
        # command the flood and the snapshots use has run once (Redis 7 allocates a latency
        # histogram of about 24 KB per command on first use), the site's scripts are loaded and its
        # connections to Redis open.
        self._throttle(LOAD_EMAIL)
        warm = b.load.flood(site.port, LOAD_EMAIL, WRONG, count=50)
        if not warm["statuses"].get("429"):
            raise RuntimeError(f"the throttled account was not refused: {warm['statuses']}")
        _wait_flushed(client, keys.FAIL_ACCOUNT + LOAD_EMAIL, 30)
        wait_quiet(site.pid)
        _snapshot(client)
        self._throttle(MEMORY_EMAIL)
        # Redis shrinks the buffers of connections idle for 2 s: the baseline, and the reading once
        # the sweeper has recorded the last summary, are taken with the connections settled.
        time.sleep(SETTLE_S)
        last = client.xrevrange(keys.AUDIT, "+", "-", count=1)[0][0].decode()
        before = _snapshot(client)
        log(f"flood: {n:,} refused logins to one account, one connection, a new 2 KB User-Agent each")
        res = b.load.flood(site.port, MEMORY_EMAIL, WRONG, count=n)
        ended = time.monotonic()
        after = _snapshot(client)
        key = keys.FAIL_ACCOUNT + MEMORY_EMAIL
        pending_until = client.hget(key + ":p", "w")
        wait_s = (int(pending_until) - time.time() * 1000) / 1000 if pending_until else 0.0
        flushed = None
        if wait_s <= 30:
            _wait_flushed(client, key, wait_s + 10)
            time.sleep(max(0.0, ended + SETTLE_S - time.monotonic()))
            flushed = _snapshot(client)
        else:
            log(f"flood: not waiting {wait_s:.0f} s for the sweeper's last summary")
        written = _read_events(client, last)
        refused = res["statuses"].get("429", 0)
        failed = res["statuses"].get("401", 0)
        attempts = res["requests"]
        recorded = sum(1 for e in written if e["r"] == events.THROTTLED and not e["n"])
        counted = sum(e["n"] for e in written if e["r"] == events.THROTTLED and e["n"])
        out: dict[str, Any] = {
            "attempts": attempts, "refused": refused, "failed": failed, "statuses": res["statuses"],
            "sent": res["sent"], "rate": res["rps"], "user_agent_bytes": res["user_agent_bytes"],
            "bytes_per_attempt": (after["used_memory"] - before["used_memory"]) / attempts,
            "key_bytes_per_attempt": (sum(after["keys"].values()) - sum(before["keys"].values())) / attempts,
            "connection_bytes_per_attempt": (after["connections"] - before["connections"]) / attempts,
            "events_after_attempts": after["stream"] - before["stream"],
            "before": before["info"], "after": after["info"],
            "key_growth_after_attempts": _growth(before["keys"], after["keys"]),
            "refused_recorded_one_by_one": recorded, "refused_counted_in_summaries": counted,
            "trail_accounts_for_every_refusal": recorded + counted == refused,
            "events": [{k: v for k, v in e.items() if v not in ("", 0)} for e in written],
            "events_by_kind": dict(Counter(f"{e['t']}/{e['r']}" + (" (summary)" if e["n"] else "")
                                           for e in written)),
            "summary_recorded_by_sweeper": flushed is not None,
        }
        if flushed is not None:
            out |= {
                "bytes_per_attempt_with_summary": (flushed["used_memory"] - before["used_memory"]) / attempts,
                "key_bytes_per_attempt_with_summary": (sum(flushed["keys"].values())
                                                       - sum(before["keys"].values())) / attempts,
                "events_with_summary": flushed["stream"] - before["stream"],
                "flushed": flushed["info"], "key_growth_with_summary": _growth(before["keys"], flushed["keys"]),
            }
        worst = max(out["bytes_per_attempt"], out.get("bytes_per_attempt_with_summary", 0))
        out["bytes_per_attempt_worst"] = worst
        top = sorted(out.get("key_growth_with_summary", out["key_growth_after_attempts"]).items(),
                     key=lambda kv: -abs(kv[1]))[:6]
        log(f"flood: {attempts:,} attempts ({refused:,} refused, {failed} checked) at {res['rps']:,.0f}/s: "
            f"used_memory +{out['bytes_per_attempt']:.1f} B/attempt after them "
            f"(keys {out['key_bytes_per_attempt']:.1f}, connections {out['connection_bytes_per_attempt']:.1f}), "
            f"+{out.get('bytes_per_attempt_with_summary', float('nan')):.1f} B/attempt once the sweeper recorded the "
            f"last summary; {out.get('events_with_summary', out['events_after_attempts'])} events "
            f"{out['events_by_kind']}; growth by key {dict(top)}")
        if not out["trail_accounts_for_every_refusal"]:
            log(f"flood: WARNING the trail shows {recorded} + {counted} refused attempts, not {refused}")
        return out

    # -- other users' pages during the flood ---------------------------------------------------

    def pages(self) -> dict[str, Any]:
        assert self.site is not None
        b = self.b
        site = self.site
        dur = b.opts.flood_duration
        conns = b.opts.flood_conns
        headers = {"Cookie": self.cookie}
        b.load.closed(site.port, "/account", 32, 1, headers)  # warm-up
        capacity = b.load.closed(site.port, "/account", 32, 2, headers)["rps"]
        rate = round(min(400.0, max(50.0, 0.25 * capacity)))
        # Push the account to its longest backoff: when its wait is over, each connection with an
        # attempt in flight has its password checked (and fails): with 8, the wait reaches its cap.
        if int(site.redis.hget(keys.FAIL_ACCOUNT + LOAD_EMAIL, "n") or 0) < self.settings.login_account_threshold:
            self._throttle(LOAD_EMAIL)
        push = b.load.finish_storm(b.load.start_flood(site.port, LOAD_EMAIL, WRONG, conns,
                                                      self.settings.login_backoff_base + 2.5),
                                   timeout=60, what="login flood")
        wait_quiet(site.pid)
        log(f"flood: /account paced at {rate} req/s (capacity {capacity:.0f} req/s), calm and during a flood "
            f"of refused logins on {conns} connections; pushing the account to its longest backoff let "
            f"{push['statuses'].get('401', 0)} attempts have their password checked")

        def note(calm: dict[str, Any], flood: dict[str, Any], f: dict[str, Any]) -> str:
            return (f"site {calm['site_cpu_util']:.0%} / {flood['site_cpu_util']:.0%} of its core); "
                    f"flood {f['rps']:,.0f} attempts/s {f['statuses']}")

        rounds, floods = paced_rounds(
            b, "flood", site, rate, dur, headers, what="login flood", note=note, site_cpu=True,
            start=lambda: b.load.start_flood(site.port, LOAD_EMAIL, WRONG, conns, dur + 2))
        return {
            "rate": rate, "account_capacity_rps": capacity, "duration": dur, "flood_conns": conns,
            "push_to_cap": push, "checked_at_window_end": push["statuses"].get("401", 0), **rounds, "floods": floods,
            "flood_rate": median(x["rps"] for x in floods),
            "flood_not_refused": sum(x["bad_status"] + x["errors"] for x in floods),
            "page_failures": sum(x["bad_status"] + x["errors"] for x in rounds["calm"] + rounds["flood"]),
        }

    # -- the user-agent dictionaries after a retention trim ------------------------------------

    def dictionaries(self) -> dict[str, Any]:
        b = self.b
        days, per_day, keep = b.opts.trail_days, b.opts.trail_per_day, b.opts.trail_keep_days
        server = b.children.redis_server("flood-trail")
        client = redis.Redis.from_url(server.url)
        try:
            n = days * per_day
            end_ms = int(time.time() * 1000) - 60_000
            log(f"flood: a trail of {n:,} events over {days} days, each with a new 512-byte user agent")
            seconds = data.load_stream(client, _trail(n, end_ms - days * DAY_MS, end_ms))
            # Retention removes sealed batches only (seal.py): a site seals the trail first, as it would have.
            sealer = Site(b.children, "flood-trail-seal", redis_server=server).start()
            try:
                if sealing.wait_sealed(client, 60) is None:
                    raise RuntimeError("the site did not seal the trail within 60 s")
            finally:
                sealer.stop()
                sealer.redis.close()
            before = _dictionaries(client)
            stream_before = client.xlen(keys.AUDIT)
            data_dir = b.children.tmp / "flood-trail"
            data_dir.mkdir(exist_ok=True)
            start = time.perf_counter()
            done = b.children.run([PY, str(ROOT / "server.py"), "audit", "trim", f"--redis-url={server.url}",
                                   f"--data-dir={data_dir}", f"--audit-retention-days={keep}", "--log-format=json"],
                                  "server", timeout=120, env=site_env(), cwd=str(ROOT))
            trim_s = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"audit trim failed ({done.returncode}): {done.stderr[-500:]}")
            after = _dictionaries(client)
            kept_days, unresolved = _kept_days(client)
            out = {
                "days": days, "events": n, "load_s": seconds, "keep_days": keep,
                "trim_output": done.stdout.strip(), "trim_s": trim_s,
                "stream_before": stream_before, "stream_after": client.xlen(keys.AUDIT),
                "before": before, "after": after, "event_days_after": sorted(kept_days),
                "only_kept_days_remain": set(after["days"]) == kept_days,
                "kept_events_without_agent": unresolved,
                "bytes_ratio": ratio(after["bytes"], before["bytes"]),
            }
            log(f"flood: dictionaries before trim: {len(before['days'])} ({before['entries']:,} entries, "
                f"{before['bytes'] / 2**20:.1f} MiB); after `audit trim` keeping {keep} days ({trim_s:.1f} s): "
                f"{len(after['days'])} ({after['entries']:,} entries, {after['bytes'] / 2**20:.1f} MiB), days "
                f"{after['days']} for events of days {sorted(kept_days)}; {unresolved} kept events without their agent")
            return out
        finally:
            client.close()
            b.children.stop_redis(server)


def _post_login(port: int, email: str, password: str, xsrf: str) -> Response:
    body = urllib.parse.urlencode({"email": email, "password": password, "_xsrf": xsrf})
    return request(port, "POST", "/login", body=body, headers={
        "Cookie": f"_xsrf={xsrf}", "Content-Type": "application/x-www-form-urlencoded"})


def _wait_flushed(client: redis.Redis, key: str, timeout: float) -> None:
    """Until the sweeper has recorded the pending summary of ``key`` (at most ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while client.zscore(keys.THROTTLE_DUE, key) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sweeper did not record the summary of {key} within {timeout:.0f} s")
        time.sleep(0.1)


INFO_FIELDS = ("used_memory", "used_memory_dataset", "used_memory_overhead", "used_memory_scripts")


def _snapshot(client: redis.Redis) -> dict[str, Any]:
    """used_memory, the memory of the connections' buffers (CLIENT LIST tot-mem: INFO's
    mem_clients_normal is updated only now and then), the stream's length and every key's memory."""
    stream, key_memory = client.xlen(keys.AUDIT), _key_memory(client)
    connections = sum(int(c.get("tot-mem", 0)) for c in client.client_list())
    info = client.info("memory")
    return {"used_memory": info["used_memory"], "connections": connections,
            "info": {k: info.get(k) for k in INFO_FIELDS} | {"connections_tot_mem": connections},
            "stream": stream, "keys": key_memory}


def _key_memory(client: redis.Redis) -> dict[str, int]:
    """MEMORY USAGE (every element counted) of all keys, summed by key pattern."""
    names = list(client.scan_iter(count=1000))
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.memory_usage(name, samples=0)
        sizes = pipe.execute()
    out: Counter[str] = Counter()
    for name, size in zip(names, sizes, strict=True):
        out[_pattern(name.decode())] += size or 0
    return dict(out)


def _pattern(key: str) -> str:
    key = re.sub(r"[^:]+@[^:]+", "<email>", key)
    return re.sub(r"(?<=:)[0-9]+(?=:|$)", "<n>", key)


def _growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if after.get(k, 0) != before.get(k, 0)}


def _read_events(client: redis.Redis, after_id: str) -> list[dict[str, Any]]:
    out = []
    for entry_id, f in client.xrange(keys.AUDIT, "(" + after_id, "+"):
        def field(name: bytes, fields: dict[bytes, bytes] = f) -> str:
            return fields.get(name, b"").decode()
        out.append({"id": entry_id.decode(), "t": field(b"t"), "r": field(b"r"), "n": int(field(b"n") or 0),
                    "k": int(field(b"k") or 0), "f": field(b"f"), "a": field(b"a")})
    return out


def _trail(n: int, start_ms: int, end_ms: int) -> Any:
    """``n`` failed logins spread evenly from ``start_ms`` to ``end_ms``, each with a new user agent
    (512 bytes, the most the site keeps), as LOADER argument groups."""
    spacing = (end_ms - start_ms) / n
    filler = "(KHTML, like Gecko) " * 26
    for k in range(n):
        uid = 1 + k % 1000
        agent = f"Mozilla/5.0 (trail {k:09d}; X11; Linux x86_64) AppleWebKit/537.36 {filler}"[:512]
        yield [int(start_ms + k * spacing), events.LOGIN_FAILED, "", uid, data.email_of(uid), "",
               f"203.0.{k % 256}.{k // 256 % 250 + 1}", agent, events.BAD_CREDENTIALS, ""]


def _dictionaries(client: redis.Redis) -> dict[str, Any]:
    """The per-day user-agent dictionaries: days, entries and bytes (MEMORY USAGE, every entry)."""
    names = sorted(client.scan_iter(match=keys.AGENTS + "*", count=1000))
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hlen(name)
            pipe.memory_usage(name, samples=0)
        replies = pipe.execute()
    return {"days": [int(name.decode().rsplit(":", 1)[1]) for name in names],
            "entries": sum(replies[0::2]), "bytes": sum(x or 0 for x in replies[1::2]),
            "legacy": bool(client.exists(keys.LEGACY_AGENTS))}


def _kept_days(client: redis.Redis) -> tuple[set[int], int]:
    """The days of the events left in the stream, and how many of them no dictionary names the agent of."""
    days: set[int] = set()
    unresolved = 0
    cursor = "-"
    while True:
        entries = client.xrange(keys.AUDIT, cursor, "+", count=2000)
        if not entries:
            break
        with client.pipeline(transaction=False) as pipe:
            for entry_id, f in entries:
                pipe.hexists(keys.agents_key(entry_id), f.get(b"g", b""))
            found = pipe.execute()
        for (entry_id, f), ok in zip(entries, found, strict=True):
            days.add(int(entry_id.split(b"-")[0]) // DAY_MS)
            unresolved += 0 if ok or not f.get(b"g") else 1
        cursor = "(" + entries[-1][0].decode()
    return days, unresolved
