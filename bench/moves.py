"""Measurement 11: what the check for sessions that move (issue 10) costs an authenticated page.

The site's own session store, in this process, on a Redis of its own: one live session is loaded
(the page's one round trip: the touch script) again and again, in interleaved rounds, with the
check (the address and browser digests sent and compared, as every page does) and without it
(the digests left out, which the script takes as "nothing to compare"). Both the time a load takes
as this client sees it (Python and Redis) and the script's own time in Redis (INFO commandstats)
are compared. The session lists no others (a plain page, not /account).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import data
import redis
import redis.asyncio as aioredis
from common import PASSWORD, log, median, ratio

from sessionaudit.sessions import SessionStore

UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
LOADS = 4000  # per round and side, in two blocks (ABBA)


class Moves:
    def __init__(self, bench: Any):
        self.b = bench

    def run(self) -> dict[str, Any]:
        server = self.b.children.redis_server("moves")
        try:
            return asyncio.run(self._run(server.url))
        finally:
            self.b.children.stop_redis(server)

    async def _run(self, url: str) -> dict[str, Any]:
        sync = redis.Redis.from_url(url)
        data.write_users(sync, 1, data.default_hasher().hash(PASSWORD), int(time.time() * 1000))
        client = aioredis.Redis.from_url(url)
        store = SessionStore(client, {1: b"bench-session-key"}, time.time, idle=1800, lifetime=43200)
        _, ref, args = store.login_args("1", data.email_of(1), ip="127.0.0.1", user_agent=UA)
        await store.scripts.login(args=[store.now_ms(), *args])
        with_pair = store.pair

        async def loads(check: bool) -> tuple[float, float, int]:
            """LOADS / 2 loads: their time (s), and the script's total time and calls in Redis."""
            store.pair = with_pair if check else (lambda ip, ua: "")  # type: ignore[method-assign]
            sync.config_resetstat()
            start = time.perf_counter()
            for _ in range(LOADS // 2):
                assert await store.load(ref, ip="127.0.0.1", user_agent=UA)
            elapsed = time.perf_counter() - start
            stats = sync.info("commandstats")  # the page's script runs as a function on Redis 7
            script = stats.get("cmdstat_fcall") or stats["cmdstat_evalsha"]
            return elapsed, script["usec"], script["calls"]

        await loads(True)  # warm up: scripts loaded, connection open
        rounds: list[dict[str, float]] = []
        for r in range(self.b.opts.rounds):
            # ABBA (then BAAB): the first block of a round runs a little slower, and a drift within the
            # round weighs on both alike, so neither side is favoured by its place.
            order = (True, False, False, True) if r % 2 == 0 else (False, True, True, False)
            sums = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}
            for check in order:
                for i, value in enumerate(await loads(check)):
                    sums[check][i] += value
            this = {}
            for check, (elapsed, usec, calls) in sums.items():
                this["with" if check else "without"] = elapsed / (2 * (LOADS // 2)) * 1e6
                this["script_with" if check else "script_without"] = usec / calls
            rounds.append(this)
            log(f"moves: round {r + 1}: a load {this['with']:.1f} us with the check, {this['without']:.1f} us "
                f"without; the script {this['script_with']:.2f} / {this['script_without']:.2f} us in Redis")
        await client.aclose()
        sync.close()
        out = {key: median(x[key] for x in rounds) for key in rounds[0]}
        out["ratio"] = median(ratio(x["with"], x["without"]) for x in rounds)
        out["script_ratio"] = median(ratio(x["script_with"], x["script_without"]) for x in rounds)
        out["loads"] = LOADS
        return out
