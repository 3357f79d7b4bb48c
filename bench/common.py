"""Shared helpers of the benchmarks: pinned child processes that are always cleaned up, the site
and its own Redis, small HTTP calls, /proc readings and statistics. Stdlib and the site's deps only.
"""

from __future__ import annotations

import ctypes
import http.client
import http.cookies
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(ROOT / "site") not in sys.path:
    sys.path.insert(0, str(ROOT / "site"))

import redis  # noqa: E402

from sessionaudit import config  # noqa: E402
from sessionaudit.redis_server import RedisServer, free_port  # noqa: E402

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
COOKIE_SECRET = "bench-cookie-secret-0123456789abcdef0123456789"
SESSION_SECRET = "bench-session-secret-0123456789abcdef"
PASSWORD = "bench horse battery staple 9137"
UA = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/124.0.0.0 Safari/537.36 bench")

PR_SET_PDEATHSIG = 1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics ----------------------------------------------------------------------------

def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- CPU pinning ---------------------------------------------------------------------------

class Pinning:
    """Server on one core; load generators, Redis and this script on the other (when there are two)."""

    def __init__(self, enabled: bool = True):
        self.all = sorted(os.sched_getaffinity(0))
        self.taskset = shutil.which("taskset")
        self.enabled = enabled and len(self.all) >= 2
        self.server_cpu = self.all[0]
        self.load_cpu = self.all[1] if len(self.all) > 1 else self.all[0]

    def describe(self) -> str:
        if not self.enabled:
            return f"off ({len(self.all)} core(s) available)"
        tool = "taskset" if self.taskset else "sched_setaffinity"
        return f"server on cpu {self.server_cpu}; load, Redis and bench on cpu {self.load_cpu} ({tool})"

    def cpu(self, role: str) -> int:
        return self.server_cpu if role == "server" else self.load_cpu

    def server_cores(self) -> int:
        return 1 if self.enabled else len(self.all)

    def prefix(self, role: str) -> list[str]:
        if not self.enabled or not self.taskset:
            return []
        return [self.taskset, "-c", str(self.cpu(role))]

    def pin_pid(self, pid: int, role: str) -> None:
        """Pin a running process and all its threads."""
        if not self.enabled:
            return
        if self.taskset:
            subprocess.run([self.taskset, "-a", "-p", "-c", str(self.cpu(role)), str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setaffinity(int(tid), {self.cpu(role)})
            except OSError:
                pass

    def pin_self(self, role: str | None) -> None:
        """Pin this process (None: all cores again). Children started later inherit it."""
        if self.enabled:
            os.sched_setaffinity(0, set(self.all) if role is None else {self.cpu(role)})


def _die_with_parent() -> None:
    # In the child before exec: if the bench dies, even by SIGKILL, the child gets SIGTERM.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Children:
    """Every process the bench starts: stopped in reverse order by ``close`` (also on error and Ctrl-C)."""

    def __init__(self, pinning: Pinning, tmp: Path):
        self.pinning = pinning
        self.tmp = tmp
        self.procs: list[subprocess.Popen[Any]] = []
        self.redis: list[RedisServer] = []

    def popen(self, args: list[str], role: str, **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.pinning.prefix(role) + args, start_new_session=True,
                                preexec_fn=_die_with_parent, **kw)
        self.procs.append(proc)
        if not self.pinning.taskset:
            self.pinning.pin_pid(proc.pid, role)
        return proc

    def run(self, args: list[str], role: str, timeout: float, input: str | None = None,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run to completion (bounded in time); killed if it overstays."""
        proc = self.popen(args, role, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, **kw)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{' '.join(args[:3])}... did not finish within {timeout:.0f} s") from None
        finally:
            if proc in self.procs:
                self.procs.remove(proc)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream:
                stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def redis_server(self, name: str) -> RedisServer:
        workdir = self.tmp / f"redis-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        server = RedisServer.ephemeral(workdir)
        self.redis.append(server)
        server.start()
        if server.process:
            self.pinning.pin_pid(server.process.pid, "load")
        return server

    def stop_redis(self, server: RedisServer) -> None:
        server.stop()
        if server in self.redis:
            self.redis.remove(server)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc, timeout=5)
            except Exception as e:  # keep going: everything must be stopped
                log(f"could not stop pid {proc.pid}: {e}")
        for server in reversed(list(self.redis)):
            try:
                self.stop_redis(server)
            except Exception as e:
                log(f"could not stop redis-server: {e}")


# -- /proc ---------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU time of one thread (the main thread of a process has tid == pid)."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_quiet(pid: int, timeout: float = 15.0, below: float = 0.15) -> float:
    """Wait until a process uses less than ``below`` of a core over half a second (work left
    over from a previous run, such as queued password hashes); returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        c0 = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - c0 < below * 0.5:
            break
    return time.monotonic() - start


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- HTTP ----------------------------------------------------------------------------------

class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def cookies(self) -> dict[str, str]:
        jar: dict[str, str] = {}
        for name, value in self.headers:
            if name.lower() == "set-cookie":
                parsed = http.cookies.SimpleCookie()
                parsed.load(value)
                for key, morsel in parsed.items():
                    jar[key] = morsel.value
        return jar


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | str | None = None, timeout: float = 30.0) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"User-Agent": UA, **(headers or {})})
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def wait_http(port: int, path: str = "/healthz", timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None,
              log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}:\n{tail}")
        try:
            if request(port, "GET", path, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer {path} within {timeout:.0f} s")


def xsrf_token(port: int) -> str:
    token = request(port, "GET", "/login").cookies().get("_xsrf")
    if not token:
        raise RuntimeError("GET /login set no _xsrf cookie")
    return token


def login(port: int, email: str, password: str = PASSWORD, xsrf: str | None = None,
          user_agent: str = UA) -> tuple[str, float]:
    """Log in the honest way (POST /login with the _xsrf cookie and field): (sid cookie value, seconds)."""
    xsrf = xsrf or xsrf_token(port)
    body = urllib.parse.urlencode({"email": email, "password": password, "_xsrf": xsrf})
    start = time.perf_counter()
    resp = request(port, "POST", "/login", body=body, headers={
        "Cookie": f"_xsrf={xsrf}", "Content-Type": "application/x-www-form-urlencoded", "User-Agent": user_agent})
    elapsed = time.perf_counter() - start
    sid = resp.cookies().get("sid")
    if resp.status != 303 or not sid:
        raise RuntimeError(f"login of {email} answered {resp.status}: {resp.body[:300]!r}")
    return sid, elapsed


def browser_cookie(port: int, path: str, sid: str) -> str:
    """The Cookie header a browser sends after logging in: the session, and the _xsrf cookie that
    the first page after login sets (else every page would mint and set a new XSRF token)."""
    resp = request(port, "GET", path, headers={"Cookie": f"sid={sid}"})
    if resp.status != 200:
        raise RuntimeError(f"GET {path} with a fresh session answered {resp.status}")
    xsrf = resp.cookies().get("_xsrf")
    return f"sid={sid}; _xsrf={xsrf}" if xsrf else f"sid={sid}"


# -- the site ------------------------------------------------------------------------------

def site_env() -> dict[str, str]:
    """The environment for a site process: our secrets, and none of the site's options from outside."""
    env = {k: v for k, v in os.environ.items()
           if k not in {config.env_name(f.name) for f in config.cli_fields()}}
    env.update(COOKIE_SECRET=COOKIE_SECRET, SESSION_SECRET=SESSION_SECRET, PYTHONUNBUFFERED="1")
    return env


class Site:
    """``server.py`` in its own process (pinned to the server core), on its own ephemeral Redis."""

    def __init__(self, children: Children, name: str, redis_server: RedisServer | None = None,
                 extra_args: Sequence[str] = ()):
        self.children = children
        self.name = name
        self.redis_server = redis_server or children.redis_server(name)
        self.url = self.redis_server.url
        self.redis = redis.Redis.from_url(self.url)
        self.port = free_port()
        self.data_dir = children.tmp / f"site-{name}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[Any] | None = None
        self.log_path = self.data_dir / "server.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def redis_pid(self) -> int | None:
        return self.redis_server.process.pid if self.redis_server.process else None

    def start(self) -> Site:
        logf = open(self.log_path, "ab")
        self.proc = self.children.popen(
            [PY, str(ROOT / "server.py"), f"--redis-url={self.url}", f"--port={self.port}",
             f"--data-dir={self.data_dir}", *self.extra_args],
            role="server", stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, env=site_env(), cwd=str(ROOT))
        logf.close()
        wait_http(self.port, proc=self.proc, log_path=self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.children.stop(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.redis.close()
        self.children.stop_redis(self.redis_server)

    def create_user_cli(self, email: str, admin: bool = False, password: str = PASSWORD) -> str:
        """``server.py create-user`` (default argon2 costs), password on stdin."""
        args = [PY, str(ROOT / "server.py"), "create-user", f"--email={email}", f"--redis-url={self.url}",
                f"--data-dir={self.data_dir}"] + (["--admin"] if admin else [])
        done = self.children.run(args, "load", timeout=120, input=password + "\n", env=site_env(), cwd=str(ROOT))
        if done.returncode != 0:
            raise RuntimeError(f"create-user {email} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def commandstats(client: redis.Redis) -> dict[str, int]:
    """calls per command from INFO commandstats (the INFO calls themselves excluded)."""
    out: dict[str, int] = {}
    for name, value in client.info("commandstats").items():
        cmd = name.removeprefix("cmdstat_")
        if cmd in ("info",):
            continue
        out[cmd] = int(value["calls"]) if isinstance(value, dict) else 0
    return out


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
