"""Formatting for templates: times, durations, user agents. Pure functions, cached where costly."""

from __future__ import annotations

import datetime as dt
import functools
import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ua_parser
from markupsafe import Markup

from .events import iso_ms, next_id

if TYPE_CHECKING:
    from .sessions import SessionView


def utc(ms: int | None) -> str:
    """``2026-11-28 16:35:50 UTC``."""
    return _utc_second(ms // 1000) if ms else ""


@functools.lru_cache(maxsize=4096)
def _utc_second(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    if not result.user_agent or result.user_agent.family == "Other":
        return user_agent if len(user_agent) <= 40 else user_agent[:39] + "…"
    browser = result.user_agent.family
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


def when(ms: int | None, now_ms: int) -> Markup:
    """``<time datetime="ISO" title="UTC">3 min ago</time>``: one filter for what pages show of a
    moment (three filters and a call cost a page of rows most of its rendering)."""
    return Markup(_when(ms, now_ms // 1000) if ms else "")  # noqa: S704 (dates and numbers only)


@functools.lru_cache(maxsize=4096)
def _when(ms: int, now_second: int) -> str:
    # By the second of "now": a page's moments are shown again by the next pages of that second.
    return f'<time datetime="{iso_ms(ms)}" title="{utc(ms)}">{ago(ms, now_second * 1000)}</time>'


def session_rows(sessions: Sequence[SessionView], current_ref: str, now_ms: int, xsrf: object) -> Markup:
    """The rows of /account's table of sessions, one ``<tr>`` each, with the form that ends it.

    The one piece of a page built here rather than in a template: it is on the hottest page, and
    Jinja2 spends a microsecond on every value it writes (nine a row) where an f-string with
    ``html.escape`` spends a tenth of that. Every value from outside is escaped.
    """
    out = []
    for s in sessions:
        this = s.ref == current_ref
        device = html.escape(ua_summary(s.user_agent))
        ip = html.escape(s.ip or "unknown")
        moved = ""
        if s.moved:
            what = "address and browser" if s.moved == 3 else "address" if s.moved == 1 else "browser"
            moved = f'<br><span class="warn-tag">Used from a new {what} since sign-in</span>'
        if this:
            row, tag, button = ' class="this"', ' <strong class="tag">This device</strong>', "small"
            action = "Sign out here"
        else:
            row, tag, button = "", "", "small danger"
            action = f'End session<span class="visually-hidden"> on {device} from {ip}</span>'
        out.append(
            f'<tr{row}>\n<td data-label="Device"><span title="{html.escape(s.user_agent)}">{device}</span>'
            f'{tag}{moved}</td>\n'
            f'<td data-label="Address">{ip}</td>\n'
            f'<td data-label="Signed in">{_when(s.created, now_ms // 1000) if s.created else ""}</td>\n'
            f'<td data-label="Last seen">{_when(s.last_seen, now_ms // 1000) if s.last_seen else ""}</td>\n'
            f'<td data-label="Action"><form method="post" action="/account/sessions/{html.escape(s.ref)}/revoke" '
            f'class="inline">{html_of(xsrf)}<button type="submit" class="{button}">{action}</button></form></td>\n'
            f'</tr>\n')
    return Markup("".join(out))  # noqa: S704 (every value above is escaped)


def html_of(value: object) -> str:
    """A template value as HTML: its ``__html__`` when it has one (Markup, the XSRF field), else escaped."""
    to_html = getattr(value, "__html__", None)
    return to_html() if to_html else html.escape(str(value))


FILTERS = {"utc": utc, "duration": duration, "ua": ua_summary, "iso": iso_ms, "when": when, "ago": ago,
           "next_id": next_id}


# -- charts (server-side SVG) -------------------------------------------------------------

SERIES_STYLE = {  # colour, dash pattern (so the lines differ without colour too), label
    "login": ("#1a7f37", "", "Sign-ins"),
    "login_failed": ("#cf222e", "6 3", "Failed sign-ins"),
    "expired": ("#9a6700", "2 3", "Expiries"),
    "revoked": ("#8250df", "10 3 2 3", "Revocations"),
}


def nice_max(value: int, ticks: int = 4) -> int:
    """A round axis maximum at or above ``value`` that ``ticks`` equal whole steps divide: 4, 8, 20, 40, ..."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if value <= step * m * ticks:
                return step * m * ticks
        step *= 10


def line_chart(starts: list[int], counts: dict[str, list[int]], unit: str, width: int = 720,
               height: int = 240) -> dict[str, object]:
    """Geometry for an SVG line chart of several series over equal buckets."""
    left, right, top, bottom = 44, 16, 12, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = nice_max(max([1, *(max(v) for v in counts.values())]))
    n = len(starts)

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: int) -> float:
        return top + plot_h - plot_h * v / peak

    lines = []
    for name, values in counts.items():
        colour, dash, label = SERIES_STYLE[name]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        lines.append({"name": name, "colour": colour, "dash": dash, "label": label, "points": points,
                      "total": sum(values)})
    every = 6 if unit == "hour" else 5
    ticks = []
    for i, start in enumerate(starts):
        if (n - 1 - i) % every == 0:
            moment = dt.datetime.fromtimestamp(start / 1000, dt.UTC)
            ticks.append({"x": x(i), "label": moment.strftime("%H:00" if unit == "hour" else "%d %b")})
    grid = [{"y": y(peak * k // 4), "label": peak * k // 4} for k in range(5)]
    return {"width": width, "height": height, "lines": lines, "ticks": ticks, "grid": grid, "left": left,
            "right": width - right, "bottom": top + plot_h}


def session_spans(events: list, now_ms: int, limit: int = 15) -> dict[str, object]:
    """Bars for a user's sessions (login to end, or to now while live) from their newest events."""
    ends = {e.session: e for e in events if e.type in ("logout", "expired", "revoked") and e.session}
    spans = []
    for e in events:
        if e.type == "login" and e.session:
            end = ends.get(e.session)
            spans.append({"ref": e.session, "start": e.at, "end": end.at if end else now_ms,
                          "how": end.type if end else "live", "ua": e.user_agent, "ip": e.ip})
    spans = sorted(spans, key=lambda s: -s["start"])[:limit]
    if not spans:
        return {"bars": [], "height": 0}
    lo, hi = min(s["start"] for s in spans), max(max(s["end"] for s in spans), now_ms)
    span = max(hi - lo, 1)
    width, left, row = 720, 8, 22
    bars = []
    for i, s in enumerate(spans):
        x0 = left + (width - 2 * left) * (s["start"] - lo) / span
        x1 = left + (width - 2 * left) * (s["end"] - lo) / span
        bars.append({**s, "x": x0, "w": max(x1 - x0, 3), "y": 6 + i * row, "duration": duration(s["end"] - s["start"])})
    return {"bars": bars, "width": width, "height": 12 + len(spans) * row, "from": lo, "to": hi}
