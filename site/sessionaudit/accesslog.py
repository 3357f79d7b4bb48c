"""The access log: one line per request, formatted straight into the log stream.

A request's line is written without building a ``logging.LogRecord`` (the logging HOWTO's
"Optimization": a record per request was a tenth of a page's CPU), in the format the process's
log handler gives every other line, text or JSON. The stream is the handler's own, buffered and
flushed twice a second by ``serve``, so lines keep their order with the rest of the log. Without
a stream (tests, an app built without ``serve``) lines go through ``logging`` as any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("sessionaudit.access")


class AccessLog:
    """``line(...)`` once per request; ``configure`` points it at the log stream."""

    def __init__(self) -> None:
        self.write: Callable[[str], Any] | None = None
        self.json = False
        self._second = -1
        self._stamp = ""

    def configure(self, write: Callable[[str], Any] | None, json: bool) -> None:
        self.write = write
        self.json = json

    def line(self, request_id: str, method: str, path: str, status: int, seconds: float, user: str | None,
             route: str) -> None:
        ms = seconds * 1000
        if self.write is None or status >= 500:  # errors also reach whatever watches the logging module
            level = logging.INFO if status < 500 else logging.ERROR
            if level == logging.ERROR or log.isEnabledFor(logging.INFO):
                log.log(level, "%s %s %s %d %.1fms user=%s", request_id, method, path, status, ms, user or "-",
                        extra={"request_id": request_id, "method": method, "route": route, "path": path,
                               "status": status, "duration_ms": round(ms, 2), "user": user})
            return
        now = time.time()
        if self.json:
            self.write(orjson.dumps({
                "time": self._time(now, json=True), "level": "info", "logger": "sessionaudit.access",
                "message": f"{request_id} {method} {path} {status} {ms:.1f}ms user={user or '-'}",
                "request_id": request_id, "method": method, "route": route, "path": path, "status": status,
                "duration_ms": round(ms, 2), "user": user}).decode() + "\n")
        else:
            self.write(f"{self._time(now)} INFO    sessionaudit.access: {request_id} {method} {path} {status} "
                       f"{ms:.1f}ms user={user or '-'}\n")

    def _time(self, now: float, json: bool = False) -> str:
        """The time as logging.Formatter (text: local, ``,ms``) or the JSON formatter (UTC, ``.msZ``) writes it."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S" if json else "%Y-%m-%d %H:%M:%S",
                                        time.gmtime(second) if json else time.localtime(second))
        ms = int((now - second) * 1000)
        return f"{self._stamp}.{ms:03d}Z" if json else f"{self._stamp},{ms:03d}"
