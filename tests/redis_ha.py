"""A Redis primary, its replicas and three Sentinels on loopback, for the failover tests.

Real redis-server processes (the binary the site's launcher finds), free ports, short Sentinel
timeouts (down after 1 s) so a failover takes a few seconds. Every wait polls; nothing sleeps a
fixed time. The Sentinels are told about each other and about the replicas in their config files,
so they can vote on a failover as soon as they run instead of after their first discovery rounds.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import redis

from sessionaudit.redis_server import RedisServer, RedisServerError, find_redis_server, free_port

MASTER = "sa"  # the name the Sentinels monitor
REPL_USER, REPL_PASSWORD = "repl", "repl-link-secret"  # the replicas' own Redis user: cut_replication turns it off
DOWN_AFTER_MS = 1000


class HAUnavailable(RuntimeError):
    """This redis-server cannot run the cluster (no Sentinel mode, too old): the tests skip."""


class Cluster:
    """``replicas`` replicas of one primary, and three Sentinels with quorum 2.

    ``password`` protects the data nodes (``requirepass``), ``sentinel_password`` the Sentinels;
    with ``tls`` (see ``make_certificates``) every node and Sentinel speaks TLS only and asks
    clients for a certificate.
    """

    def __init__(self, workdir: Path, replicas: int = 2, password: str = "", sentinel_password: str = "",
                 tls: Path | None = None):
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        self.nodes: dict[int, RedisServer] = {}  # port -> data node (primary or replica)
        self.sentinels: list[RedisServer] = []
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.first_primary = free_port()
        self.replica_ports = [free_port() for _ in range(replicas)]

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> Cluster:
        try:
            self._node(self.first_primary).start()
            for port in self.replica_ports:
                self._node(port, replica_of=self.first_primary).start()
            ids = [secrets.token_hex(20) for _ in self.sentinel_ports]
            for i, port in enumerate(self.sentinel_ports):
                self._sentinel(i, port, ids).start()
        except RedisServerError as e:
            self.stop()
            what = "Sentinel with TLS" if self.tls else "Sentinel"
            raise HAUnavailable(f"{find_redis_server()} cannot run {what} here: {str(e).splitlines()[0]}") from None
        self.wait_ready()
        return self

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes.values()]:
            self._resume(server)
            server.stop(timeout=5)
        self.sentinels.clear()
        self.nodes.clear()

    def _node(self, port: int, replica_of: int | None = None) -> RedisServer:
        workdir = self.workdir / f"node-{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        extra = ["--user", REPL_USER, "on", f">{REPL_PASSWORD}", "~*", "&*", "+@all",
                 "--masteruser", REPL_USER, "--masterauth", REPL_PASSWORD,
                 "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                 "--logfile", str(workdir / "redis.log")]
        if self.password:
            extra += ["--requirepass", self.password]
        if replica_of:
            extra += ["--replicaof", "127.0.0.1", str(replica_of)]
        if self.tls:
            extra += ["--port", "0", "--tls-port", str(port), *self._tls_options("--")]
        server = RedisServer.ephemeral(workdir, port=port, extra=extra)
        if self.password or self.tls:  # RedisServer.ping() sends a bare PING; NOAUTH also proves it is up
            server.ping = lambda s=server: _answers(s.url, self.tls)  # type: ignore[method-assign]
        self.nodes[port] = server
        return server

    def _sentinel(self, i: int, port: int, ids: list[str]) -> RedisServer:
        workdir = self.workdir / f"sentinel-{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            *([f"port {port}"] if not self.tls else ["port 0", f"tls-port {port}", *self._tls_options("")]),
            "bind 127.0.0.1", "protected-mode no", f"dir {workdir}",
            f"logfile {workdir / 'sentinel.log'}", f"sentinel myid {ids[i]}",
            f"sentinel monitor {MASTER} 127.0.0.1 {self.first_primary} 2",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} 4000",
            f"sentinel parallel-syncs {MASTER} 4",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {MASTER} {self.password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        lines += [f"sentinel known-replica {MASTER} 127.0.0.1 {p}" for p in self.replica_ports]
        lines += [f"sentinel known-sentinel {MASTER} 127.0.0.1 {p} {ids[j]}"
                  for j, p in enumerate(self.sentinel_ports) if j != i]
        conf = workdir / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")
        server = RedisServer([str(conf), "--sentinel"], f"redis://127.0.0.1:{port}", workdir)
        if self.sentinel_password or self.tls:
            server.ping = lambda s=server: _answers(s.url, self.tls)  # type: ignore[method-assign]
        self.sentinels.append(server)
        return server

    # -- what the tests do to it -------------------------------------------------------------

    @property
    def sentinel_option(self) -> str:
        """The value of --redis-sentinel."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def primary_port(self) -> int:
        """The primary's port as the Sentinels report it."""
        for port in self.sentinel_ports:
            try:
                with self._sentinel_client(port) as s:
                    addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                    if addr:
                        return int(addr[1])
            except redis.exceptions.RedisError:
                continue
        raise AssertionError("no Sentinel answers")

    def client(self, port: int) -> redis.Redis:
        """A plain (sync) client of one data node, for the tests' own reads."""
        return redis.Redis(host="127.0.0.1", port=port, password=self.password or None, socket_timeout=5,
                           **self._tls_client())

    def primary_client(self) -> redis.Redis:
        return self.client(self.primary_port())

    def kill_primary(self) -> int:
        """SIGKILL the primary (no shutdown, no last writes); returns its port."""
        port = self.primary_port()
        server = self.nodes[port]
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        return port

    def planned_failover(self) -> int:
        """Ask the Sentinels to hand the primary role to a replica (maintenance); returns the old port.

        First every replica holds every write: a Sentinel picks the replica by the offsets it last
        read (up to 10 s old), so one still catching up could be promoted and lose what it lacks."""
        self.wait_replicas_synced()
        port = self.primary_port()
        with self._sentinel_client(self.sentinel_ports[0]) as s:
            s.execute_command("SENTINEL", "FAILOVER", MASTER)
        return port

    def restart(self, port: int) -> None:
        """Start a killed node again (empty: no persistence); the Sentinels make it a replica."""
        self.nodes[port].start()

    def pause_writes(self, ms: int) -> None:
        """The primary holds every client's writes (scripts included) for ``ms`` milliseconds."""
        with self.primary_client() as c:
            c.execute_command("CLIENT", "PAUSE", ms, "WRITE")

    def cut_replication(self) -> None:
        """Replicas stop receiving the primary's writes (their Redis user is turned off and their
        links dropped) while every client keeps working: what a primary's last writes look like
        just before it dies. What was written before is on every replica."""
        self.wait_replicas_synced()
        with self.primary_client() as c:
            c.execute_command("ACL", "SETUSER", REPL_USER, "off")
            c.execute_command("CLIENT", "KILL", "USER", REPL_USER)

    def restore_replication(self) -> None:
        with self.primary_client() as c:
            c.execute_command("ACL", "SETUSER", REPL_USER, "on")
        self.wait_replicas_synced()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every Sentinel knows the primary, its replicas and the two other Sentinels."""
        replicas = len(self.replica_ports)

        def ready() -> bool:
            for port in self.sentinel_ports:
                with self._sentinel_client(port) as s:
                    state = _pairs(s.execute_command("SENTINEL", "MASTER", MASTER))
                    if state.get("flags") != "master" or int(state.get("num-other-sentinels", 0)) < 2:
                        return False
                    links = [_pairs(r) for r in s.execute_command("SENTINEL", "REPLICAS", MASTER)]
                    if sum(1 for r in links if r.get("flags") == "slave"
                           and r.get("master-link-status") == "ok") < replicas:
                        return False
            return True

        poll(ready, timeout, "the Sentinels to see the primary, its replicas and each other")
        self.wait_replicas_synced()

    def wait_replicas_synced(self, timeout: float = 20.0, count: int | None = None) -> None:
        """Until ``count`` replicas (default: all) hold everything the primary has: a write of our
        own, acknowledged by them (WAIT). "online" in INFO is not enough: after a full sync a replica
        is online a moment before the primary streams writes to it."""
        want = count if count is not None else len(self.replica_ports)

        def synced() -> bool:
            with self.primary_client() as c:
                c.set("ha:probe", time.time())
                return int(c.execute_command("WAIT", want, 500)) >= want

        poll(synced, timeout, f"{want} replica(s) to hold every write")

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until every Sentinel names a new primary that says it is one; returns its port."""
        def switched() -> bool:
            ports = set()
            for port in self.sentinel_ports:
                with self._sentinel_client(port) as s:
                    addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                    ports.add(int(addr[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            with self.client(ports.pop()) as c:
                return c.info("replication").get("role") == "master"

        poll(switched, timeout, "the Sentinels to fail over")
        return self.primary_port()

    def _sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.sentinel_password or None,
                           socket_timeout=2, socket_connect_timeout=2, **self._tls_client())

    def _tls_options(self, dash: str) -> list[str]:
        """Server TLS settings, as command-line arguments (dash "--") or config lines (dash "")."""
        assert self.tls
        pairs = [("tls-cert-file", self.tls / "server.pem"), ("tls-key-file", self.tls / "server.key"),
                 ("tls-ca-cert-file", self.tls / "ca.pem"), ("tls-replication", "yes"), ("tls-auth-clients", "yes")]
        if dash:
            return [part for name, value in pairs for part in (f"--{name}", str(value))]
        return [f"{name} {value}" for name, value in pairs]

    def _tls_client(self) -> dict[str, object]:
        if not self.tls:
            return {}
        return {"ssl": True, "ssl_ca_certs": str(self.tls / "ca.pem"), "ssl_certfile": str(self.tls / "client.pem"),
                "ssl_keyfile": str(self.tls / "client.key")}

    @staticmethod
    def _resume(server: RedisServer) -> None:
        if server.process and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)


def poll(predicate, timeout: float, what: str) -> None:
    """Call ``predicate`` every 50 ms until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (redis.exceptions.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _pairs(flat: list) -> dict[str, str]:
    if isinstance(flat, dict):
        return {_text(k): _text(v) for k, v in flat.items()}
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _answers(url: str, tls: Path | None = None) -> bool:
    """PING (over TLS with ``tls``); an answer asking for a password also proves the server is up."""
    host, port = url.split("//", 1)[1].split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5) as raw:
            if not tls:
                raw.sendall(b"PING\r\n")
                return raw.recv(64).startswith((b"+PONG", b"-NOAUTH"))
            context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
            context.load_cert_chain(str(tls / "client.pem"), str(tls / "client.key"))
            with context.wrap_socket(raw, server_hostname=host) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def make_certificates(directory: Path) -> Path | None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl); None without openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    if not openssl:
        return None
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf")
    return directory
