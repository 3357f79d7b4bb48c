"""No enumeration by time: a reset request for an existing account takes as long as one for an unknown email.

Measured from outside, as an attacker would: the real site (``python server.py``) in its own process,
this test as the client over one keep-alive connection. For interleaved pairs of requests (one for
an account, one for an unknown email, in alternating order) it records the answer's time, and the
time of a page fetched right after it (which the work that follows the answer, such as the mail,
would slow down). The two requests of a pair are a few milliseconds apart, so the difference
within each pair is free of the load that other processes put on the machine; the median of those
differences must be near zero.
"""

from __future__ import annotations

import http.client
import statistics
import time
import urllib.parse
from pathlib import Path

import redis

from process import Site, wait_until
from sessionaudit import keys, users

PAIRS = 150
TRIES = 2  # a busy machine can skew one round of measurements; a leak skews every round
FAKE_HASH = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaA"  # never verified here


class Client:
    """One keep-alive connection to the site, with the XSRF cookie and field."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", "/password/forgot")
        first = self.conn.getresponse()
        first.read()
        self.xsrf = first.getheader("Set-Cookie").split("_xsrf=", 1)[1].split(";", 1)[0]
        self.headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"_xsrf={self.xsrf}"}

    def timed(self, method: str, path: str, body: str | None = None) -> float:
        start = time.perf_counter()
        self.conn.request(method, path, body=body, headers=self.headers)
        response = self.conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        return time.perf_counter() - start

    def ask(self, address: str) -> tuple[float, float]:
        """(the answer's time, the time of a page fetched at once after it)."""
        answer = self.timed("POST", "/password/forgot", urllib.parse.urlencode({"email": address, "_xsrf": self.xsrf}))
        return answer, self.timed("GET", "/login")


def measure(client: Client, round_no: int) -> tuple[str, bool]:
    """One round: PAIRS interleaved pairs; (a report, whether the answers and the next pages match)."""
    diffs: dict[str, list[float]] = {"answer": [], "next page": []}
    known_times: dict[str, list[float]] = {"answer": [], "next page": []}
    for i in range(PAIRS):
        pair = [("known", f"known{round_no}.{i}@example.com"), ("unknown", f"unknown{round_no}.{i}@example.com")]
        got: dict[str, tuple[float, float]] = {}
        for kind, address in (pair if i % 2 else pair[::-1]):
            time.sleep(0.01)  # each request starts on an idle server (the spacing is the protocol, not a wait)
            got[kind] = client.ask(address)
        for n, what in enumerate(diffs):
            diffs[what].append(got["known"][n] - got["unknown"][n])
            known_times[what].append(got["known"][n])
    ok, parts = True, []
    for what, values in diffs.items():
        median_diff, typical = statistics.median(values), statistics.median(known_times[what])
        # Composing and writing the mail in the request's path (or right after it) adds about 1-2 ms.
        ok = ok and abs(median_diff) < max(0.0005, 0.15 * typical)
        parts.append(f"{what}: median {typical * 1000:.2f} ms, known minus unknown {median_diff * 1000:+.2f} ms")
    return "; ".join(parts) + f" ({PAIRS} pairs)", ok


def test_unknown_emails_take_as_long_as_known_ones(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    register = client.register_script(keys.LUA_PRELUDE + users.REGISTER)
    for round_no in range(-1, TRIES):
        for i in range(PAIRS):
            register(args=[int(time.time() * 1000), f"known{round_no}.{i}@example.com", FAKE_HASH, "0", "", ""])
    client.close()
    site = Site(tmp_path, f"--redis-url={redis_url}", LOGIN_ACCOUNT_THRESHOLD="1000",
                LOGIN_ADDRESS_THRESHOLD="100000")
    reports = []
    try:
        http_client = Client(site.port)
        for i in range(10):  # warm up both paths
            http_client.ask(f"known-1.{i}@example.com")
            http_client.ask(f"warm{i}@example.com")
        for round_no in range(TRIES):
            report, ok = measure(http_client, round_no)
            reports.append(report)
            print(report)
            if ok:
                break
        http_client.conn.close()
        outbox = tmp_path / "outbox"
        mails = 10 + PAIRS * len(reports)
        assert wait_until(lambda: len(list(outbox.glob("*.eml"))) == mails)  # every account got its mail
    finally:
        assert site.stop() == 0
    assert ok, "\n".join(reports)
