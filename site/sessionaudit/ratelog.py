"""Security log lines that a flood cannot multiply: at most one line per kind per interval.

An attacker who sends a thousand forged forms a second would otherwise write a thousand warnings
a second (each flushed at once). The first of a kind is logged as it comes; the ones after it in
the same interval are counted and the next line says how many there were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """``warning(kind, msg, *args)``: like ``logger.warning``, at most once per ``interval`` per kind."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 64):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_kinds = max_kinds  # kinds are a fixed vocabulary of the code, but bound them anyway
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        if kind not in self._last and len(self._last) >= self.max_kinds:
            self._last.clear()
            self._suppressed.clear()
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        if more:
            msg += " (and %d more like it in the %.0f s before)"
            args = (*args, more, now - last if last is not None else self.interval)
        self.logger.warning(msg, *args)
