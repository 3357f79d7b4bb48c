"""What high availability costs: `--redis-wait-replicas=1` per login and per logout, and how long a
Sentinel failover keeps the site from answering (`.venv/bin/python bench/sentinel.py [--quick]`).

Runs on the Redis cluster of the failover tests (tests/redis_ha.py: a primary, replicas and three
Sentinels on loopback, down after 1 s), with the site as its own process found through Sentinel.

1. Cost of WAIT: two site processes on one cluster (a primary and one replica), one with
   `--redis-wait-replicas=0`, one with `=1`; the same logins and logouts in interleaved rounds,
   each request timed by the client. Once with cheap argon2 costs, so the Redis part is what is
   measured, and once with the default costs, which is what a real login costs.
2. Failover: a fresh cluster (two replicas) and one site (`--redis-wait-replicas=1`) each run; a
   logged-in page and a login are requested every 20 ms while the primary is killed with SIGKILL.
   Reports the time from the kill to the first good page and the first good login, and the
   statuses seen meanwhile.

Prints a table (medians, ratios within the run); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import PASSWORD, PY, ROOT, Children, Pinning, log, login, request, site_env, wait_http, xsrf_token

from redis_ha import MASTER, Cluster
from sessionaudit.redis_server import free_port

CHEAP_ARGON2 = ["--argon2-time-cost=1", "--argon2-memory-cost=1024", "--argon2-parallelism=1"]


class SiteProcess:
    """server.py through the cluster's Sentinels."""

    def __init__(self, children: Children, cluster: Cluster, name: str, *args: str):
        self.port = free_port()
        data_dir = children.tmp / f"site-{name}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "server.log"
        with open(self.log_path, "ab") as out:
            self.proc = children.popen(
                [PY, str(ROOT / "server.py"), f"--port={self.port}", f"--data-dir={data_dir}",
                 f"--redis-sentinel={cluster.sentinel_option}", f"--redis-sentinel-master={MASTER}",
                 "--sweep-interval=3600", *args],
                role="server", stdout=out, stderr=out, env=site_env(), cwd=str(ROOT))
        wait_http(self.port, proc=self.proc, log_path=self.log_path)

    def register(self, email: str) -> None:
        xsrf = xsrf_token(self.port)
        body = urllib.parse.urlencode({"email": email, "password": PASSWORD, "password_confirm": PASSWORD,
                                       "_xsrf": xsrf})
        resp = request(self.port, "POST", "/register", body=body, headers={
            "Cookie": f"_xsrf={xsrf}", "Content-Type": "application/x-www-form-urlencoded"})
        if resp.status != 303:
            raise RuntimeError(f"register answered {resp.status}")

    def logout(self, sid: str) -> float:
        xsrf = xsrf_token(self.port)
        body = urllib.parse.urlencode({"_xsrf": xsrf})
        start = time.perf_counter()
        resp = request(self.port, "POST", "/logout", body=body, headers={
            "Cookie": f"sid={sid}; _xsrf={xsrf}", "Content-Type": "application/x-www-form-urlencoded"})
        elapsed = time.perf_counter() - start
        if resp.status != 303:
            raise RuntimeError(f"logout answered {resp.status}")
        return elapsed


def wait_cost(children: Children, rounds: int, samples: int, argon2: list[str], label: str) -> dict[str, float]:
    """Median login and logout times (ms) with --redis-wait-replicas 0 and 1, and the median of
    their differences: each login (and logout) on one site is paired with the next on the other,
    so both see the same load from whatever else runs on the machine."""
    cluster = Cluster(children.tmp / f"ha-wait-{label}", replicas=1).start()
    try:
        sites = {n: SiteProcess(children, cluster, f"wait{n}-{label}", f"--redis-wait-replicas={n}", *argon2)
                 for n in (0, 1)}
        for n, site in sites.items():
            site.register(f"bench{n}@example.com")
            for _ in range(3):  # warm: scripts loaded, connections open
                sid, _ = login(site.port, f"bench{n}@example.com")
                site.logout(sid)
        times: dict[str, list[float]] = {f"{kind}{n}": [] for kind in ("login", "logout") for n in (0, 1)}
        for r in range(rounds):
            for i in range(samples):
                for n in ((0, 1) if (r * samples + i) % 2 == 0 else (1, 0)):
                    sid, took = login(sites[n].port, f"bench{n}@example.com")
                    times[f"login{n}"].append(took)
                    times[f"logout{n}"].append(sites[n].logout(sid))
            log(f"wait cost ({label}): round {r + 1}/{rounds}")
        for site in sites.values():
            children.stop(site.proc)
        out = {k: statistics.median(v) * 1000 for k, v in times.items()}
        for kind in ("login", "logout"):
            out[f"{kind}+"] = statistics.median(b - a for a, b in zip(times[f"{kind}0"], times[f"{kind}1"],
                                                                          strict=True)) * 1000
        return out
    finally:
        cluster.stop()


def failover(children: Children, run: int) -> dict[str, object]:
    """SIGKILL the primary under load; seconds to the first good page and login, statuses seen."""
    cluster = Cluster(children.tmp / f"ha-failover-{run}", replicas=2).start()
    try:
        site = SiteProcess(children, cluster, f"failover{run}", "--redis-wait-replicas=1",
                           "--redis-wait-timeout=0.5", *CHEAP_ARGON2)
        site.register("watcher@example.com")
        sid, _ = login(site.port, "watcher@example.com")
        seen: Counter[str] = Counter()  # requests sent after the kill
        in_flight: Counter[str] = Counter()  # sent before it, answered after
        first: dict[str, float] = {}
        killed_at = 0.0
        stop = threading.Event()

        def probe(kind: str) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    if kind == "page":
                        ok = request(site.port, "GET", "/account", headers={"Cookie": f"sid={sid}"},
                                     timeout=10).status
                        good = ok == 200
                    else:
                        login(site.port, "watcher@example.com")
                        ok, good = 303, True
                except RuntimeError as e:  # login() raises on any other status
                    ok, good = int(str(e).split("answered ")[1].split(":")[0]), False
                except OSError:
                    ok, good = 0, False
                if killed_at and sent < killed_at:
                    in_flight[f"{kind} {ok}"] += 1
                elif killed_at:
                    seen[f"{kind} {ok}"] += 1
                    if good and kind not in first:
                        first[kind] = time.monotonic() - killed_at
                time.sleep(0.02)

        threads = [threading.Thread(target=probe, args=(k,), daemon=True) for k in ("page", "login")]
        for t in threads:
            t.start()
        time.sleep(0.3)
        cluster.kill_primary()
        killed_at = time.monotonic()  # requests sent before are in flight at the kill
        deadline = time.monotonic() + 60
        while len(first) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(15)
        children.stop(site.proc)
        log(f"failover {run}: page after {first.get('page', float('nan')):.2f} s, "
            f"login after {first.get('login', float('nan')):.2f} s; {dict(seen)}; in flight {dict(in_flight)}")
        return {"page": first.get("page"), "login": first.get("login"), "seen": dict(seen),
                "in_flight": dict(in_flight)}
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and samples, one failover")
    args = parser.parse_args()
    rounds, samples, slow_samples, failovers = (2, 10, 3, 1) if args.quick else (6, 40, 10, 3)
    pinning = Pinning(enabled=False)  # the cluster's six processes and the sites share the cores
    children = Children(pinning, Path(tempfile.mkdtemp(prefix="sessionaudit-ha-")))
    try:
        cheap = wait_cost(children, rounds, samples, CHEAP_ARGON2, "cheap")
        real = wait_cost(children, rounds, slow_samples, [], "default")
        runs = [failover(children, i) for i in range(failovers)]
    finally:
        children.close()

    def row(name: str, m: dict[str, float], kind: str) -> str:
        a, b = m[f"{kind}0"], m[f"{kind}1"]
        return f"| {name} | {a:.2f} ms | {b:.2f} ms | {m[kind + '+']:+.2f} ms ({b / a:.2f}x) |"

    print("| measurement (median) | --redis-wait-replicas=0 | =1 | cost of WAIT (median of paired differences) |")
    print("|---|---|---|---|")
    print(row("login, POST /login, cheap argon2", cheap, "login"))
    print(row("logout, POST /logout", cheap, "logout"))
    print(row("login, POST /login, default argon2", real, "login"))
    pages = [r["page"] for r in runs if r["page"] is not None]
    logins = [r["login"] for r in runs if r["login"] is not None]
    statuses: Counter[str] = Counter()
    in_flight: Counter[str] = Counter()
    for r in runs:
        statuses.update(r["seen"])  # type: ignore[arg-type]
        in_flight.update(r["in_flight"])  # type: ignore[arg-type]
    print()
    print(f"| failover ({len(runs)} runs, down-after 1 s) | median | min | max |")
    print("|---|---|---|---|")
    for name, values in (("SIGKILL of the primary to the first good page", pages),
                         ("SIGKILL to the first good login (WAIT 1)", logins)):
        if values:
            print(f"| {name} | {statistics.median(values):.2f} s | {min(values):.2f} s | {max(values):.2f} s |")
    print(f"\nrequests sent after the kill, until both were good again: {dict(sorted(statuses.items()))}")
    print(f"requests in flight at the kill: {dict(sorted(in_flight.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
