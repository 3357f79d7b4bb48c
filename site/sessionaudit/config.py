"""Settings: every option with its default, its environment name and its help text.

Precedence, lowest first: defaults, the config file (``--config``), the environment, the
command line. Stdlib only.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import email.utils
import hashlib
import hmac
import ipaddress
import os
import secrets
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MAX_WAIT_TIMEOUT = 4.0  # seconds: a WAIT must end before the client's 5 s socket timeout


def opt(default: Any, help: str, *, flag: bool = False, cli: bool = True, secret: bool = False) -> Any:
    """A settings field with its help text; ``flag`` options take no value on the command line;
    a ``secret`` one (it may hold a password) is left out of the settings' repr."""
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
    session_binding: str = opt("off", "end a session used from another browser (browser) or address (address); "
                                      "off: record the move only")
    xheaders: bool = opt(False, "trust a proxy's headers: X-Forwarded-For/X-Real-Ip for the client address, "
                                "X-Forwarded-Proto, X-Request-Id", flag=True)
    debug: bool = opt(False, "tracebacks on error pages and template reloading; never in production", flag=True)
    password_min_length: int = opt(12, "minimum password length in characters (NIST: 15 for password-only login)")
    argon2_time_cost: int = opt(3, "argon2id passes")
    argon2_memory_cost: int = opt(65536, "argon2id memory in KiB")
    argon2_parallelism: int = opt(4, "argon2id lanes")
    hash_workers: int = opt(0, "threads that hash passwords (0: one per core the process may use)")
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
    public_url: str = opt("", "the site's origin as people reach it (https://host[:port]): links in mail, the passkey "
                              "relying party; never taken from a request's Host header (default: http://ADDRESS:PORT)")
    smtp_url: str = opt("", "mail server: smtp://[user:pass@]host:port (?starttls=1 to require STARTTLS) or "
                            "smtps://... (TLS); empty: every message is written to <data-dir>/outbox/ instead",
                        secret=True)
    mail_from: str = opt("", "From address of the site's mail (default: Session Audit <no-reply@HOST>, HOST "
                             "that of the public URL, localhost when that is an IP address)")
    # Not options: filled in by load_secrets() or by tests.
    cookie_secret: dict[int, str] = field(default_factory=dict, metadata={"cli": False})
    # Set on its own (SESSION_SECRET, or the file of an earlier version): else derived from COOKIE_SECRET.
    session_secret: bytes = field(default=b"", metadata={"cli": False})
    session_secret_source: str = field(default="", metadata={"cli": False})  # for the start-up log line
    # AUDIT_KEY (env only): the audit seal key set on its own, by version like COOKIE_SECRET; else derived from it.
    audit_key: dict[int, str] = field(default_factory=dict, metadata={"cli": False})
    template_path: str = field(default=str(ROOT / "templates"), metadata={"cli": False})
    static_path: str = field(default=str(ROOT / "static"), metadata={"cli": False})
    session_ttl_slack: int = field(default=60, metadata={"cli": False})  # seconds a key outlives its deadline
    live_heartbeat: float = field(default=15.0, metadata={"cli": False})  # seconds between SSE comments
    door_budget: int = field(default=600, metadata={"cli": False})  # events a minute a cheap door records one by one
    refusal_delay: float = field(default=0.25, metadata={"cli": False})  # s a refused attempt waits when busy
    live_recheck: float = field(default=10.0, metadata={"cli": False})  # seconds between checks of followers' rights
    write_timeout: float = field(default=30.0, metadata={"cli": False})  # s a reader may take nothing, then let go

    def validate(self) -> None:
        """Raise ValueError with a clear message for a value that cannot work."""
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"port must be 1-65535, not {self.port}")
        if self.session_idle < 1 or self.session_lifetime < 1:
            raise ValueError("session_idle and session_lifetime must be at least 1 second")
        if self.password_min_length < 8:
            raise ValueError("password_min_length below 8 is not allowed (NIST SP 800-63B-4)")
        if self.session_binding not in ("off", "browser", "address"):
            raise ValueError(f"session_binding must be off, browser or address, not {self.session_binding!r}")
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
        if self.public_url:
            parts = urllib.parse.urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
                raise ValueError(f"public_url must be an origin like https://example.com, not {self.public_url!r}")

        if self.smtp_url:
            smtp_target(self.smtp_url)  # raises ValueError with the reason
        if self.mail_from:
            _, address = email.utils.parseaddr(self.mail_from)
            if "@" not in address or any(c in self.mail_from for c in "\r\n"):
                raise ValueError(f"mail_from must be an address like 'Site <no-reply@example.com>', "
                                 f"not {self.mail_from!r}")
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
                raise ValueError(f"{name}: cannot read {path!r}")
        if self.redis_wait_replicas < 0:
            raise ValueError("redis_wait_replicas cannot be negative")
        if self.redis_wait_replicas and not (self.redis_url or self.redis_sentinel):
            raise ValueError("redis_wait_replicas needs a Redis with replicas (redis_url or redis_sentinel); "
                             "the embedded one has none")
        if not 0.01 <= self.redis_wait_timeout <= MAX_WAIT_TIMEOUT:
            raise ValueError(f"redis_wait_timeout must be between 0.01 and {MAX_WAIT_TIMEOUT:g} seconds "
                             "(below the Redis socket timeout)")

    @property
    def origin(self) -> str:
        """``public_url`` without a trailing slash, or ``http://<address>:<port>``."""
        return self.public_url.rstrip("/") or f"http://{self.address}:{self.port}"

    @property
    def sender(self) -> str:
        """``mail_from``, or ``Session Audit <no-reply@HOST>`` with the host of the public URL."""
        if self.mail_from:
            return self.mail_from
        host = urllib.parse.urlsplit(self.origin).hostname or "localhost"
        try:
            ipaddress.ip_address(host)
            host = "localhost"  # an address is no mail domain
        except ValueError:
            pass
        return f"Session Audit <no-reply@{host}>"

    @property
    def hash_threads(self) -> int:
        if self.hash_workers:
            return self.hash_workers
        try:  # the cores this process may run on (taskset, cgroups' cpusets), not all the machine's
            return len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # not Linux
            return os.cpu_count() or 1

    def derived_key(self, label: str, version: int | None = None) -> bytes:
        """A key for one purpose (``label``), derived with HKDF from COOKIE_SECRET.

        ``version`` picks one of several cookie secrets (``1:old,2:new``); the default is the
        newest, the one that signs. COOKIE_SECRET is thus the one secret processes must share.
        """
        return hkdf(self.cookie_secret[max(self.cookie_secret) if version is None else version].encode(), label)

    def session_keys(self) -> dict[int, bytes]:
        """The key that names sessions in Redis, by the version of the cookie secret that signed the cookie.

        SESSION_SECRET (or the file an earlier version generated) when set, for every version;
        else derived from each cookie secret, so a session keeps its name for as long as its
        cookie verifies, across a rotation of COOKIE_SECRET.
        """
        return {v: self.session_secret or self.derived_key(SESSION_KEY_LABEL, v) for v in self.cookie_secret}


SESSION_KEY_LABEL = "sessionaudit session ref"


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how to hand mail over, from ``--smtp-url``."""

    host: str
    port: int
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)  # never printed, logged or shown
    use_tls: bool = False  # smtps://: TLS from the first byte
    start_tls: bool = False  # ?starttls=1: upgrade the plain connection, or fail

    @property
    def safe_url(self) -> str:
        """The URL without the password, for logs."""
        scheme = "smtps" if self.use_tls else "smtp"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}" + ("?starttls=1" if self.start_tls else "")


def smtp_target(url: str) -> SmtpTarget:
    """Parse ``smtp://[user:pass@]host[:port][?starttls=1]`` or ``smtps://...``; raise ValueError otherwise.

    Ports default to 25 (smtp), 587 (smtp with STARTTLS) and 465 (smtps). User and password are
    percent-decoded, so a password may hold any character.
    """
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname or port == -1 or parts.path.strip("/") \
            or set(query) - {"starttls"} or query.get("starttls", ["0"])[-1] not in ("0", "1"):
        # The URL may hold a password: the message names the expected form, never the value.
        raise ValueError("smtp_url must look like smtp://[user:pass@]host:port[?starttls=1] or smtps://...")
    use_tls = parts.scheme == "smtps"
    start_tls = query.get("starttls", ["0"])[-1] == "1"
    if use_tls and start_tls:
        raise ValueError("smtp_url: smtps:// is TLS already; ?starttls=1 is for smtp://")
    return SmtpTarget(host=parts.hostname, port=port or (465 if use_tls else 587 if start_tls else 25),
                      username=urllib.parse.unquote(parts.username or ""),
                      password=urllib.parse.unquote(parts.password or ""), use_tls=use_tls, start_tls=start_tls)


def hkdf(secret: bytes, label: str, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869), no salt: a separate key for each purpose from one shared secret."""
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + label.encode() + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


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


KIND_NAMES = {int: "a whole number", float: "a number", str: "text"}


def convert(f: dataclasses.Field, raw: Any, source: str = "") -> Any:
    """Turn a string (or a config-file value) into the field's type, or raise ValueError naming
    ``source`` (how the user gave it: ``--session-idle``, ``SESSION_IDLE``; else the field's name)."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    label = source or f.name
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{label}: expected true or false, not {raw!r}")
    if kind is int and isinstance(raw, float):
        raise ValueError(f"{label}: expected a whole number, not {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected {KIND_NAMES.get(kind, kind.__name__)}, not {raw!r}") from None


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
        values[name] = convert(known[name], value, f"{path}:{number}: {name}")
    return values


def load_secrets(settings: Settings, environ: dict[str, str] | None = None, *, create: bool = True) -> Settings:
    """Fill in the cookie secret (and the session and audit keys set on their own) from the environment or data-dir.

    ``COOKIE_SECRET`` may be one secret or several as ``1:old,2:new`` (the highest version signs,
    all verify: rotate without logging anyone out). Without it, a random secret is generated once
    into ``<data-dir>/cookie_secret`` (mode 0600). Every other key is derived from it, unless set on
    its own: ``SESSION_SECRET`` keys the hash that names a session in Redis and in the audit trail;
    an earlier version generated one into ``<data-dir>/session_secret``, which is still used when
    present so that an upgrade logs no one out (see the README's upgrade note). ``AUDIT_KEY`` keys the
    audit seals (same ``version:secret`` form). With ``create`` false (``audit verify``) nothing is
    generated: a missing secret stays empty, since a new random one could verify nothing.
    """
    environ = os.environ if environ is None else environ
    cookie = environ.get("COOKIE_SECRET") or _secret_file(settings.data_dir, "cookie_secret", create)
    session, source = environ.get("SESSION_SECRET", ""), "SESSION_SECRET"
    legacy = Path(settings.data_dir) / "session_secret"
    if not session and legacy.exists():
        session, source = legacy.read_text().strip(), str(legacy)
    audit_key = environ.get("AUDIT_KEY", "")
    return dataclasses.replace(settings, cookie_secret=parse_cookie_secret(cookie), session_secret=session.encode(),
                               session_secret_source=source if session else "",
                               audit_key=parse_cookie_secret(audit_key, "AUDIT_KEY") if audit_key else {})


def parse_cookie_secret(text: str, name: str = "COOKIE_SECRET") -> dict[int, str]:
    """``secret`` or ``1:old,2:new`` → {version: secret}."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and ":" not in parts[0]:
        return {1: parts[0]}
    secrets_by_version: dict[int, str] = {}
    for part in parts:
        version, sep, secret = part.partition(":")
        if not sep or not version.isdigit() or len(secret) < 16:
            raise ValueError(f"{name} must be one secret or `version:secret,...` with secrets of 16+ characters")
        secrets_by_version[int(version)] = secret
    return secrets_by_version


def _secret_file(data_dir: str, name: str, create: bool = True) -> str:
    path = Path(data_dir) / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            return ""
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
