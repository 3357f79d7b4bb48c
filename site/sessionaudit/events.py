"""The audit vocabulary: event types, reasons, fields, and conversion to and from stream entries.

An event is appended to the stream ``audit:log`` by the Lua scripts that change state (see
``keys.py``); this module is the one place that knows what its fields mean. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1

REGISTER = "register"
LOGIN = "login"
LOGIN_FAILED = "login_failed"
LOGOUT = "logout"
EXPIRED = "expired"
REVOKED = "revoked"
LOCKED_OUT = "locked_out"
TYPES = (REGISTER, LOGIN, LOGIN_FAILED, LOGOUT, EXPIRED, REVOKED, LOCKED_OUT)
END_TYPES = (LOGOUT, EXPIRED, REVOKED)

# Reasons, by type.
IDLE, LIFETIME = "idle", "lifetime"
BY_USER, BY_ADMIN, PASSWORD_CHANGE = "user", "admin", "password_change"
BAD_CREDENTIALS, THROTTLED = "bad_credentials", "throttled"
REASONS = {
    EXPIRED: (IDLE, LIFETIME),
    REVOKED: (BY_USER, BY_ADMIN, PASSWORD_CHANGE),
    LOGIN_FAILED: (BAD_CREDENTIALS, THROTTLED),
}

LABELS = {
    REGISTER: "Registered",
    LOGIN: "Signed in",
    LOGIN_FAILED: "Failed sign-in",
    LOGOUT: "Signed out",
    EXPIRED: "Expired",
    REVOKED: "Revoked",
    LOCKED_OUT: "Locked out",
}

# Stream entry field names, short because every entry stores them.
# v: schema, t: type, a: at (ms), u: user id, e: email, s: session ref, i: ip, g: user agent,
# r: reason, c: actor email.
FIELDS = {"v": "v", "type": "t", "at": "a", "uid": "u", "user": "e", "session": "s",
          "ip": "i", "user_agent": "g", "reason": "r", "actor": "c"}


@dataclass(frozen=True, slots=True)
class Event:
    """One audit event as read back from the stream."""

    id: str
    type: str
    at: int  # UTC milliseconds
    user: str | None = None
    uid: str | None = None
    session: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    reason: str | None = None
    actor: str | None = None
    v: int = SCHEMA_VERSION

    @classmethod
    def from_entry(cls, entry_id: str | bytes, fields: dict[Any, Any]) -> Event:
        """Build an event from a stream entry (``XRANGE`` reply item), bytes or text."""
        def text(key: str) -> str | None:
            value = fields.get(key)
            if value is None:
                value = fields.get(key.encode())
            if value is None or value == b"" or value == "":
                return None
            return value.decode() if isinstance(value, bytes) else str(value)

        ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        at = text("a")  # written only when it differs from the id's time (an expiry's deadline)
        return cls(
            id=ident,
            type=text("t") or "",
            at=int(at) if at else id_ms(ident),
            user=text("e"),
            uid=text("u"),
            session=text("s"),
            ip=text("i"),
            user_agent=text("g"),
            reason=text("r"),
            actor=text("c"),
            v=int(text("v") or SCHEMA_VERSION),
        )

    @property
    def at_iso(self) -> str:
        return iso_ms(self.at)

    @property
    def label(self) -> str:
        return LABELS.get(self.type, self.type)

    def to_json(self) -> dict[str, Any]:
        """The exported form (``.ndjson``, SSE): the fields of the contract, in its order."""
        return {
            "id": self.id,
            "type": self.type,
            "at": self.at_iso,
            "user": self.user,
            "session": self.session,
            "ip": self.ip,
            "user_agent": self.user_agent,
            "reason": self.reason,
            "actor": self.actor,
        }


CSV_COLUMNS = ("id", "type", "at", "user", "session", "ip", "user_agent", "reason", "actor")


def iso_ms(ms: int) -> str:
    """UTC milliseconds → ``2026-11-28T16:35:50.123Z``."""
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def entry_at(entry_id: str, f: dict[bytes, bytes]) -> int:
    """An entry's `at` (ms): its own field when written (an expiry's deadline), else the id's time."""
    a = f.get(b"a")
    return int(a) if a else int(entry_id.partition("-")[0])


def entry_fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """A raw entry's flat field list as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def export_row_flat(entry_id: bytes, flat: list[bytes], agents: dict[bytes, str | None]) -> dict[str, Any]:
    """``Event.to_json`` straight from a raw entry in emit()'s field order, read by position.

    The exports' hot loop: no Event is built for the usual entry.
    """
    if len(flat) != 20 or flat[2] != b"t" or flat[16] != b"r":  # written some other way: by name
        f = entry_fields(flat)
        event = Event.from_entry(entry_id, f)
        return dataclasses.replace(event, user_agent=agents.get(f.get(b"g", b""))).to_json()
    ident = entry_id.decode()
    _v, t, a, _u, e, s, i, g, r, c = flat[1::2]
    return {"id": ident, "type": t.decode(), "at": iso_ms(int(a) if a else int(ident.partition("-")[0])),
            "user": e.decode() if e else None, "session": s.decode() if s else None,
            "ip": i.decode() if i else None, "user_agent": agents.get(g) if g else None,
            "reason": r.decode() if r else None, "actor": c.decode() if c else None}


def parse_iso(text: str) -> int:
    """ISO 8601 (date, or date and time, with or without zone; no zone means UTC) → UTC ms.

    Raises ValueError for anything else.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty time")
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return round(moment.timestamp() * 1000)


def id_ms(entry_id: str) -> int:
    """The millisecond part of a stream id."""
    return int(entry_id.split("-", 1)[0])


def valid_id(text: str) -> bool:
    ms, sep, seq = text.partition("-")
    return ms.isdigit() and (not sep or seq.isdigit()) and len(ms) <= 15 and len(seq) <= 19
