"""The cost of a login with a second factor, against a password login, on the real site.

    .venv/bin/python bench/mfa.py [--logins 15] [--passkey-logins 60] [--no-pin] [--json PATH]

Starts ``server.py`` (default argon2 costs, pinned to one core) on its own Redis, as bench/run.py
does, and measures from one client, one login at a time:

- password login: POST /login of a user without a second factor (one argon2 verify);
- TOTP login: POST /login (the password step, one verify) then POST /login/verify with a code that
  pyotp computes (each of ``--logins`` users logs in once: a code is accepted only once per step),
  each right after a password login, so that both see the same machine;
- passkey login: POST /login/passkey/options then POST /login/passkey with an assertion signed by a
  software authenticator (tests/softkey.py: ES256 with ``cryptography``, no browser);
- the site's verification of one assertion (signature, flags, origin), timed in this process.

Prints p50 and p90 of each; ``--json`` also writes every sample.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import pyotp
from common import (
    COOKIE_SECRET,
    PASSWORD,
    Children,
    Pinning,
    Site,
    log,
    percentile,
    request,
)
from softkey import SoftPasskey

ORIGIN = "https://bench.example"  # the passkeys' relying party (no browser checks it here)


class Client:
    """One browser: keeps cookies, sends the XSRF field, follows nothing."""

    def __init__(self, port: int):
        self.port = port
        self.cookies: dict[str, str] = {}

    def call(self, method: str, path: str, form: dict[str, str] | None = None) -> Any:
        body = None
        if form is not None and "_xsrf" not in self.cookies:
            self.call("GET", "/login")
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())} if self.cookies else {}
        if form is not None:
            body = urllib.parse.urlencode({**form, "_xsrf": self.cookies["_xsrf"]})
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        resp = request(self.port, method, path, headers=headers, body=body)
        for name, value in resp.cookies().items():
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        return resp

    def expect(self, status: int, method: str, path: str, form: dict[str, str] | None = None) -> Any:
        resp = self.call(method, path, form)
        if resp.status != status:
            raise RuntimeError(f"{method} {path} answered {resp.status}, not {status}: {resp.body[:300]!r}")
        return resp


def with_totp(port: int, email: str) -> str:
    """Register ``email`` and turn TOTP on; returns the secret."""
    c = Client(port)
    c.expect(303, "POST", "/register", {"email": email, "password": PASSWORD, "password_confirm": PASSWORD})
    page = c.expect(200, "POST", "/account/security/totp", {}).body.decode()
    secret = re.search(r'data-totp-secret="([A-Z2-7]+)"', page).group(1)
    c.expect(200, "POST", "/account/security/totp/confirm", {"code": pyotp.TOTP(secret).now()})
    return secret


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(samples) * 1000, "p90_ms": (percentile(samples, 90) or 0) * 1000,
            "n": len(samples)}


def run(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    site = Site(children, "mfa", extra_args=[f"--public-url={ORIGIN}"]).start()
    port = site.port
    results: dict[str, Any] = {}

    plain = Client(port)
    plain.expect(303, "POST", "/register", {"email": "plain@example.com", "password": PASSWORD,
                                            "password_confirm": PASSWORD})
    log(f"{args.logins} users with TOTP on")
    secrets_by_user = {f"totp{i}@example.com": with_totp(port, f"totp{i}@example.com") for i in range(args.logins)}
    time.sleep(max(0.0, 30 - time.time() % 30) + 0.05)  # a new time step: the codes that turned TOTP on are spent
    log("password and TOTP logins, interleaved")
    plain_s, total, second = [], [], []
    for email, secret in secrets_by_user.items():
        c = Client(port)
        c.call("GET", "/login")
        t0 = time.perf_counter()
        c.expect(303, "POST", "/login", {"email": "plain@example.com", "password": PASSWORD})
        plain_s.append(time.perf_counter() - t0)
        c = Client(port)
        c.call("GET", "/login")
        t0 = time.perf_counter()
        c.expect(303, "POST", "/login", {"email": email, "password": PASSWORD})
        t1 = time.perf_counter()
        c.expect(303, "POST", "/login/verify", {"code": pyotp.TOTP(secret).now()})
        t2 = time.perf_counter()
        total.append(t2 - t0)
        second.append(t2 - t1)
    results["password"] = {**summary(plain_s), "samples": plain_s}
    results["totp"] = {**summary(total), "second_step": summary(second), "samples": total}

    log("passkey logins")
    owner = Client(port)
    owner.expect(303, "POST", "/register", {"email": "passkey@example.com", "password": PASSWORD,
                                            "password_confirm": PASSWORD})
    key = SoftPasskey(ORIGIN, "bench.example")
    options = json.loads(owner.expect(200, "POST", "/account/security/passkeys/options", {}).body)
    owner.expect(303, "POST", "/account/security/passkeys", {"credential": key.create(options), "name": "bench"})
    total, final = [], []
    for _ in range(args.passkey_logins + 1):
        c = Client(port)
        c.call("GET", "/login")
        t0 = time.perf_counter()
        options = json.loads(c.expect(200, "POST", "/login/passkey/options", {}).body)
        ta = time.perf_counter()
        assertion = key.get(options)  # the authenticator's work, on the client: not counted
        t1 = time.perf_counter()
        c.expect(303, "POST", "/login/passkey", {"credential": assertion})
        t2 = time.perf_counter()
        total.append((ta - t0) + (t2 - t1))
        final.append(t2 - t1)
    total, final = total[1:], final[1:]
    results["passkey"] = {**summary(total), "login_request": summary(final), "samples": total}

    log("assertion verification in-process")
    results["passkey_verify"] = summary(verify_times(key))
    site.close()
    return results


def verify_times(key: SoftPasskey, n: int = 300) -> list[float]:
    """The site's own check of one assertion (PasskeyStore.verify), without Redis or HTTP."""
    from webauthn import verify_registration_response

    from sessionaudit.config import Settings
    from sessionaudit.passkeys import PasskeyStore, StoredPasskey

    store = PasskeyStore(None, Settings(cookie_secret={1: COOKIE_SECRET}, public_url=ORIGIN), time.time,  # type: ignore[arg-type]
                         None)  # type: ignore[arg-type]
    fresh = SoftPasskey(ORIGIN, "bench.example")
    reg_options = {"challenge": "", "user": {"id": "AAAAAAAAAAAAAAAAAAAAAA"}}
    registered = verify_registration_response(
        credential=fresh.create(reg_options), expected_challenge=b"", expected_rp_id="bench.example",
        expected_origin=ORIGIN)
    stored = StoredPasskey(ref="r", uid="1", email="e", public_key=registered.credential_public_key, sign_count=0,
                           handle=fresh.user_handle or b"")
    times = []
    for _ in range(n):
        assertion = store.parse_assertion(fresh.get(json.loads(store.authentication_options())))
        assert assertion is not None
        t = time.perf_counter()
        if store.verify(assertion, stored) is None:
            raise RuntimeError("the software passkey's assertion did not verify")
        times.append(time.perf_counter() - t)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=15, help="password and TOTP logins (one user each for TOTP)")
    parser.add_argument("--passkey-logins", type=int, default=60)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pinning = Pinning(not args.no_pin)
    pinning.pin_self("load")
    with tempfile.TemporaryDirectory(prefix="bench-mfa-") as tmp:
        children = Children(pinning, Path(tmp))
        try:
            results = run(args, children)
        finally:
            children.close()
    print(f"login p50 (p90), one client, default argon2 costs; pinning: {pinning.describe()}")
    print(f"  password alone          {results['password']['p50_ms']:7.1f} ms ({results['password']['p90_ms']:.1f})")
    t = results["totp"]
    print(f"  password + TOTP code    {t['p50_ms']:7.1f} ms ({t['p90_ms']:.1f});"
          f" the code step alone {t['second_step']['p50_ms']:.1f} ms")
    p = results["passkey"]
    sign_in = p["login_request"]["p50_ms"]
    print(f"  passkey                 {p['p50_ms']:7.1f} ms ({p['p90_ms']:.1f});"
          f" options {p['p50_ms'] - sign_in:.1f} ms + sign-in {sign_in:.1f} ms")
    print(f"  assertion check on the site: {results['passkey_verify']['p50_ms']:.3f} ms of CPU (p50)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
