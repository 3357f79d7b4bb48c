"""Settings: every option with its default, its environment name and its help text.

Precedence, lowest first: defaults, the config file (``--config``), the environment, the
command line. Stdlib only.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MAX_WAIT_TIMEOUT = 4.0  # seconds: a WAIT must end before the client's 5 s socket timeout


def opt(default: Any, help: str, *, flag: bool = False, cli: bool = True, secret: bool = False) -> Any:
    """A settings field with its help text; ``flag`` options take no value on the command line,
    ``secret`` ones are left out of the settings' repr."""
    return field(default=default, repr=not secret, metadata={"help": help, "flag": flag, "cli": cli})


@dataclass(frozen=True)
class Settings:
    """Every option of the site. Tests build one directly with their own values."""

    address: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8888, "port to listen on")
    redis_url: str = opt("", "Redis URL (redis://, rediss://, unix://); empty: start the embedded redis-server")
    redis_sentinel: str = opt("", "Redis Sentinels as host:port,host:port,... (instead of redis_url): the primary is "
                                  "found through them, and found again after a failover")
    redis_sentinel_master: str = opt("", "the name under which the Sentinels monitor the primary")
    redis_username: str = opt("", "Redis user on the servers the Sentinels name (with redis_url: in the URL)")
    redis_password: str = opt("", "its password; better from the environment than on the command line",
                              secret=True)
    redis_sentinel_username: str = opt("", "user on the Sentinels themselves, when they require one")
    redis_sentinel_password: str = opt("", "password of the Sentinels themselves", secret=True)
    redis_tls: bool = opt(False, "TLS to the Sentinels and to the servers they name", flag=True)
    redis_tls_ca: str = opt("", "CA certificates (PEM file) that sign the Redis and Sentinel certificates; "
                                "implies redis_tls")
    redis_tls_cert: str = opt("", "client certificate (PEM file) for servers that ask for one; implies redis_tls")
    redis_tls_key: str = opt("", "the client certificate's private key (PEM file)")
    redis_wait_replicas: int = opt(0, "replicas that must hold a state change (login, logout, expiry...) before "
                                      "it is answered (Redis WAIT); 0: answer at once")
    redis_wait_timeout: float = opt(1.0, "seconds a state change waits for redis_wait_replicas; past it, 503")
    data_dir: str = opt("var", "directory for the embedded Redis, its AOF and the generated secrets")
    session_idle: int = opt(1800, "seconds without a request that end a session (sliding)")
    session_lifetime: int = opt(43200, "seconds after login that end a session regardless")
    secure_cookies: bool = opt(False, "mark cookies Secure (serve over HTTPS)", flag=True)
    xheaders: bool = opt(False, "trust X-Forwarded-For/X-Real-Ip from a proxy for the client address", flag=True)
    debug: bool = opt(False, "tracebacks on error pages and template reloading; never in production", flag=True)
    password_min_length: int = opt(12, "minimum password length in characters (NIST: 15 for password-only login)")
    argon2_time_cost: int = opt(3, "argon2id passes")
    argon2_memory_cost: int = opt(65536, "argon2id memory in KiB")
    argon2_parallelism: int = opt(4, "argon2id lanes")
    hash_workers: int = opt(0, "threads that hash passwords (0: one per core)")
    hash_queue: int = opt(64, "logins waiting for a hash thread before new ones get 503")
    sweep_interval: float = opt(1.0, "seconds between sweeps for expired sessions")
    audit_retention_days: int = opt(365, "days of audit history kept (0: keep for ever)")
    audit_page_max: int = opt(200, "largest page of the audit trail")
    login_account_threshold: int = opt(5, "failed logins for one account before it is throttled")
    login_address_threshold: int = opt(100, "failed logins from one address before it is throttled")
    login_window: int = opt(900, "seconds a failed login counts against an account or address")
    login_backoff_base: float = opt(2.0, "first throttle delay in seconds; it doubles with each further failure")
    login_backoff_max: float = opt(300.0, "longest throttle delay in seconds")
    max_followers: int = opt(100, "live audit followers per process before new ones get 503")
    metrics_address: str = opt("127.0.0.1", "address of the Prometheus listener")
    metrics_port: int = opt(0, "port of the Prometheus listener (0: off)")
    log_format: str = opt("text", "log format: text or json")
    config: str = opt("", "file of `name = value` lines read before the environment and command line")
    # Not options: filled in by load_secrets() or by tests.
    cookie_secret: dict[int, str] = field(default_factory=dict, metadata={"cli": False})
    session_secret: bytes = field(default=b"", metadata={"cli": False})
    template_path: str = field(default=str(ROOT / "templates"), metadata={"cli": False})
    static_path: str = field(default=str(ROOT / "static"), metadata={"cli": False})
    session_ttl_slack: int = field(default=60, metadata={"cli": False})  # seconds a key outlives its deadline
    live_heartbeat: float = field(default=15.0, metadata={"cli": False})  # seconds between SSE comments

    def validate(self) -> None:
        """Raise ValueError with a clear message for a value that cannot work."""
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"port must be 1-65535, not {self.port}")
        if self.session_idle < 1 or self.session_lifetime < 1:
            raise ValueError("session_idle and session_lifetime must be at least 1 second")
        if self.password_min_length < 8:
            raise ValueError("password_min_length below 8 is not allowed (NIST SP 800-63B-4)")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.sweep_interval <= 0:
            raise ValueError("sweep_interval must be positive")
        if self.audit_retention_days < 0:
            raise ValueError("audit_retention_days must be 0 (keep) or more")
        for name in ("login_account_threshold", "login_address_threshold", "login_window",
                     "audit_page_max", "max_followers", "hash_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.hash_workers < 0 or self.metrics_port < 0:
            raise ValueError("hash_workers and metrics_port cannot be negative")
        self._validate_redis()

    def _validate_redis(self) -> None:
        if self.redis_sentinel:
            if self.redis_url:
                raise ValueError("give either redis_url or redis_sentinel, not both")
            parse_sentinels(self.redis_sentinel)
            if not self.redis_sentinel_master:
                raise ValueError("redis_sentinel needs redis_sentinel_master: the name the Sentinels monitor "
                                 "the primary under")
        else:
            only_with_sentinel = [name for name in (
                "redis_sentinel_master", "redis_username", "redis_password", "redis_sentinel_username",
                "redis_sentinel_password", "redis_tls", "redis_tls_ca", "redis_tls_cert", "redis_tls_key")
                if getattr(self, name)]
            if only_with_sentinel:
                raise ValueError(f"{', '.join(only_with_sentinel)} apply to Redis found through redis_sentinel; "
                                 "with redis_url, put credentials and TLS (rediss://) in the URL")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            raise ValueError("redis_tls_cert and redis_tls_key go together")
        for name in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path}")
        if self.redis_wait_replicas < 0:
            raise ValueError("redis_wait_replicas cannot be negative")
        if self.redis_wait_replicas and not (self.redis_url or self.redis_sentinel):
            raise ValueError("redis_wait_replicas needs a Redis with replicas (redis_url or redis_sentinel); "
                             "the embedded one has none")
        if not 0.01 <= self.redis_wait_timeout <= MAX_WAIT_TIMEOUT:
            raise ValueError(f"redis_wait_timeout must be between 0.01 and {MAX_WAIT_TIMEOUT:g} seconds "
                             "(below the Redis socket timeout)")

    @property
    def hash_threads(self) -> int:
        return self.hash_workers or (os.cpu_count() or 1)


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` (IPv6 as ``[::1]:26379``) → [(host, port)]; ValueError when malformed."""
    found: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(",")):
        host, sep, port = part.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"redis_sentinel: expected host:port[,host:port...], not {part!r}")
        found.append((host, int(port)))
    return found


def cli_fields() -> list[dataclasses.Field]:
    """The settings fields that are options (command line, environment, config file)."""
    return [f for f in dataclasses.fields(Settings) if f.metadata.get("cli", True)]


def env_name(name: str) -> str:
    return name.upper()


def convert(f: dataclasses.Field, raw: Any) -> Any:
    """Turn a string (or a config-file value) into the field's type, or raise ValueError."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{f.name}: expected true or false, not {raw!r}")
    if kind is int and isinstance(raw, float):
        raise ValueError(f"{f.name}: expected a whole number, not {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{f.name}: expected {kind.__name__}, not {raw!r}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """Read `name = value` lines as tornado.options.parse_config_file does, without executing code.

    Values are Python literals (``2``, ``"redis://..."``, ``True``); a bare word is taken as text.
    """
    known = {f.name: f for f in cli_fields()}
    values: dict[str, Any] = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, raw = line.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name.isidentifier():
            raise ValueError(f"{path}:{number}: expected `name = value`")
        if name not in known or name == "config":
            raise ValueError(f"{path}:{number}: unknown option {name!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        values[name] = convert(known[name], value)
    return values


def load_secrets(settings: Settings) -> Settings:
    """Fill in the cookie and session secrets from the environment or from files in data-dir.

    ``COOKIE_SECRET`` may be one secret or several as ``1:old,2:new`` (the highest version signs,
    all verify: rotate without logging anyone out). Without it, a random secret is generated once
    into ``<data-dir>/cookie_secret`` (mode 0600). ``SESSION_SECRET`` keys the hash that names a
    session in Redis and in the audit trail; it must stay the same for as long as sessions live.
    """
    cookie = os.environ.get("COOKIE_SECRET") or _secret_file(settings.data_dir, "cookie_secret")
    session = os.environ.get("SESSION_SECRET") or _secret_file(settings.data_dir, "session_secret")
    return dataclasses.replace(settings, cookie_secret=parse_cookie_secret(cookie), session_secret=session.encode())


def parse_cookie_secret(text: str) -> dict[int, str]:
    """``secret`` or ``1:old,2:new`` → {version: secret}."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and ":" not in parts[0]:
        return {1: parts[0]}
    secrets_by_version: dict[int, str] = {}
    for part in parts:
        version, sep, secret = part.partition(":")
        if not sep or not version.isdigit() or len(secret) < 16:
            raise ValueError("COOKIE_SECRET must be one secret or `version:secret,...` with secrets of 16+ characters")
        secrets_by_version[int(version)] = secret
    return secrets_by_version


def _secret_file(data_dir: str, name: str) -> str:
    path = Path(data_dir) / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    # Write then link: the file appears whole or not at all, and the first process wins.
    tmp = path.with_name(f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        tmp.unlink()
    return value
