"""Run the real site as a subprocess: `python server.py ...`, polled on /healthz, stopped by signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import ROOT
from sessionaudit.redis_server import free_port

SERVER = str(ROOT / "server.py")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("REDIS_URL", "COOKIE_SECRET", "SESSION_SECRET", "SMTP_URL", "PUBLIC_URL", "MAIL_FROM")}
    base.update({"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_COST": "1024", "ARGON2_PARALLELISM": "1"})
    base.update(extra)
    return base


def run(*args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SERVER, *args], input=stdin, capture_output=True, text=True,
                          env=env(**extra), timeout=60)


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code
    except OSError:
        return None


def redis_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "redis" / "redis.pid").read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except OSError:
        return False
    return state != "Z"


class Site:
    def __init__(self, data_dir: Path, *args: str, host: str = "127.0.0.1", **extra: str):
        """``host``: the name the site is reached by; another than 127.0.0.1 becomes its --public-url
        (passkeys need a host name, such as localhost)."""
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        if host != "127.0.0.1":
            args = (*args, f"--public-url={self.url}")
        self.log = data_dir / f"site-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, SERVER, f"--port={self.port}", f"--data-dir={data_dir}",
                                          *args], env=env(**extra), stdout=out, stderr=subprocess.STDOUT)
        if not wait_until(lambda: status(self.url + "/healthz") == 200 or self.proc.poll() is not None):
            self.proc.kill()
        assert status(self.url + "/healthz") == 200, self.output()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.log.read_text()
