"""Formatting for templates: times, durations, user agents. Pure functions, cached where costly."""

from __future__ import annotations

import datetime as dt
import functools

import ua_parser

from .events import iso_ms


def utc(ms: int | None) -> str:
    """``2026-11-28 16:35:50 UTC``."""
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ms: int | None, now_ms: int) -> str:
    """``3 min ago``, ``in 5 s`` (relative to ``now_ms``)."""
    if not ms:
        return ""
    delta = (now_ms - ms) / 1000
    future = delta < 0
    text = duration(abs(delta) * 1000)
    if text == "0 s":
        return "just now"
    return f"in {text}" if future else f"{text} ago"


def duration(ms: float | None) -> str:
    """``2 h 5 min``, ``45 s``: the two largest units."""
    if ms is None:
        return ""
    seconds = int(ms // 1000)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
    return " ".join(parts[:2])


@functools.lru_cache(maxsize=2048)
def ua_summary(user_agent: str | None) -> str:
    """``Firefox 120 on Windows 10``, ``Mobile Safari 17 on iOS 17 (iPhone)``, or ``Unknown``."""
    if not user_agent:
        return "Unknown"
    result = ua_parser.parse(user_agent)
    browser = result.user_agent.family if result.user_agent else "Unknown browser"
    if result.user_agent and result.user_agent.major:
        browser += f" {result.user_agent.major}"
    text = browser
    if result.os and result.os.family != "Other":
        os_name = result.os.family + (f" {result.os.major}" if result.os.major else "")
        text += f" on {os_name}"
    if result.device and result.device.family not in ("Other", "Spider") and result.device.family not in text:
        text += f" ({result.device.family})"
    return text


def warm_up() -> None:
    """Load ua-parser's rules now rather than on the first page that needs them."""
    ua_summary("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36")


FILTERS = {"utc": utc, "duration": duration, "ua": ua_summary, "iso": iso_ms}
