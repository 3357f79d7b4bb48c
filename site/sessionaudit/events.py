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
SESSION_CHANGED = "session_changed"
PASSWORD_CHANGED = "password_changed"  # noqa: S105 (an event type)
PASSWORD_RESET_REQUESTED = "password_reset_requested"  # noqa: S105
MFA_ENABLED = "mfa_enabled"
MFA_DISABLED = "mfa_disabled"
PASSKEY_ADDED = "passkey_added"
PASSKEY_REMOVED = "passkey_removed"
REGISTER_FAILED = "register_failed"
TYPES = (REGISTER, LOGIN, LOGIN_FAILED, LOGOUT, EXPIRED, REVOKED, LOCKED_OUT, SESSION_CHANGED, PASSWORD_CHANGED,
         PASSWORD_RESET_REQUESTED, MFA_ENABLED, MFA_DISABLED, PASSKEY_ADDED, PASSKEY_REMOVED, REGISTER_FAILED)
END_TYPES = (LOGOUT, EXPIRED, REVOKED)

# Reasons, by type.
IDLE, LIFETIME = "idle", "lifetime"
BY_USER, BY_ADMIN, PASSWORD_CHANGE, PASSWORD_RESET, BINDING = "user", "admin", "password_change", "password_reset", \
    "binding"
BAD_CREDENTIALS, THROTTLED, BAD_CODE = "bad_credentials", "throttled", "bad_code"
ADDRESS, BROWSER = "address", "browser"
BY_RESET = "reset"
TAKEN, INVALID, WEAK_PASSWORD = "taken", "invalid", "weak_password"
# How a login was proved (the reason of a `login` event).
BY_PASSWORD, BY_TOTP, BY_RECOVERY_CODE, BY_PASSKEY = "password", "totp", "recovery_code", "passkey"
REASONS = {
    EXPIRED: (IDLE, LIFETIME),
    REVOKED: (BY_USER, BY_ADMIN, PASSWORD_CHANGE, PASSWORD_RESET, BINDING),
    LOGIN_FAILED: (BAD_CREDENTIALS, THROTTLED, BAD_CODE),
    LOGIN: (BY_PASSWORD, BY_TOTP, BY_RECOVERY_CODE, BY_PASSKEY),
    SESSION_CHANGED: (ADDRESS, BROWSER, f"{ADDRESS},{BROWSER}"),
    PASSWORD_CHANGED: (BY_USER, BY_RESET),
    MFA_DISABLED: (BY_USER, BY_ADMIN),
    REGISTER_FAILED: (TAKEN, INVALID, WEAK_PASSWORD, THROTTLED),
    PASSWORD_RESET_REQUESTED: (THROTTLED,),  # else none: a request that was answered
    LOCKED_OUT: ("account", "address", "device"),
}

LABELS = {
    REGISTER: "Registered",
    LOGIN: "Signed in",
    LOGIN_FAILED: "Failed sign-in",
    LOGOUT: "Signed out",
    EXPIRED: "Expired",
    REVOKED: "Revoked",
    LOCKED_OUT: "Locked out",
    SESSION_CHANGED: "Session moved",
    PASSWORD_CHANGED: "Password changed",
    PASSWORD_RESET_REQUESTED: "Password reset asked",
    MFA_ENABLED: "Two-step on",
    MFA_DISABLED: "Two-step off",
    PASSKEY_ADDED: "Passkey added",
    PASSKEY_REMOVED: "Passkey removed",
    REGISTER_FAILED: "Failed registration",
}

# Stream entry field names, short because every entry stores them.
# v: schema, t: type, a: at (ms), u: user id, e: email, s: session ref, i: ip, g: user agent,
# r: reason, c: actor email. Written only on the few events that summarise several attempts:
# n: count, f: first attempt (ms), k: distinct user agents among them.
FIELDS = {"v": "v", "type": "t", "at": "a", "uid": "u", "user": "e", "session": "s",
          "ip": "i", "user_agent": "g", "reason": "r", "actor": "c", "count": "n", "first": "f", "agents": "k"}


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
    count: int = 1  # attempts this event stands for (a summary of refused attempts: more than 1)
    first: int | None = None  # a summary's first attempt (ms)
    agents: int | None = None  # a summary's distinct user agents
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
        count, first, agents = text("n"), text("f"), text("k")
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
            count=int(count) if count else 1,
            first=int(first) if first else None,
            agents=int(agents) if agents else None,
            v=int(text("v") or SCHEMA_VERSION),
        )

    @property
    def at_iso(self) -> str:
        return iso_ms(self.at)

    @property
    def label(self) -> str:
        return LABELS.get(self.type, self.type)

    def to_json(self) -> dict[str, Any]:
        """The exported form (``.ndjson``, SSE): the fields of the contract, in its order.

        A summary of refused attempts also carries ``count``, ``first_at`` and
        ``distinct_user_agents``; every other event is exactly the contract's nine fields.
        """
        out = {
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
        if self.count != 1:
            out["count"] = self.count
            out["first_at"] = iso_ms(self.first) if self.first is not None else None
            out["distinct_user_agents"] = self.agents
        return out


# The CSV has one more column than the contract's fields: how many attempts each row stands for.
CSV_COLUMNS = ("id", "type", "at", "user", "session", "ip", "user_agent", "reason", "actor", "count")


def iso_ms(ms: int) -> str:
    """UTC milliseconds → ``2026-11-28T16:35:50.123Z``.

    The date is cached by day and the time of day is plain arithmetic: exports and the seal
    verification format every event's time, and a trail's events rarely share a second.
    """
    seconds, milli = divmod(ms, 1000)
    day, rem = divmod(seconds, 86400)
    return f"{_iso_day(day)}T{rem // 3600:02d}:{rem // 60 % 60:02d}:{rem % 60:02d}.{milli:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_day(day: int) -> str:
    return dt.date.fromordinal(719163 + day).isoformat()  # day 0 is 1970-01-01, ordinal 719163


def entry_at(entry_id: str, f: dict[bytes, bytes]) -> int:
    """An entry's `at` (ms): its own field when written (an expiry's deadline), else the id's time."""
    a = f.get(b"a")
    return int(a) if a else int(entry_id.partition("-")[0])


def entry_fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """A raw entry's flat field list as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def export_row_flat(entry_id: bytes, flat: list[bytes], agents: dict[tuple[str, bytes], str | None]) -> dict[str, Any]:
    """``Event.to_json`` straight from a raw entry in emit()'s field order, read by position.

    The exports' hot loop: no Event is built for the usual entry. ``agents`` maps (dictionary,
    key) to the user agent's text (see ``keys.agents_key``).
    """
    ident = entry_id.decode()
    if len(flat) != 20 or flat[2] != b"t" or flat[16] != b"r":  # written some other way: by name
        f = entry_fields(flat)
        event = Event.from_entry(entry_id, f)
        g = f.get(b"g", b"")
        return dataclasses.replace(event, user_agent=agents.get((agents_key(ident), g)) if g else None).to_json()
    _v, t, a, _u, e, s, i, g, r, c = flat[1::2]
    return {"id": ident, "type": t.decode(), "at": iso_ms(int(a) if a else int(ident.partition("-")[0])),
            "user": e.decode() if e else None, "session": s.decode() if s else None,
            "ip": i.decode() if i else None, "user_agent": agents.get((agents_key(ident), g)) if g else None,
            "reason": r.decode() if r else None, "actor": c.decode() if c else None}


def agents_key(entry_id: str | bytes) -> str:
    """The user-agent dictionary that an event's user-agent key refers to: ``audit:ua:<day of its id>``."""
    ms = entry_id.split(b"-" if isinstance(entry_id, bytes) else "-", 1)[0]
    return f"audit:ua:{int(ms) // 86_400_000}"


def id_ms(entry_id: str) -> int:
    """The millisecond part of a stream id."""
    return int(entry_id.split("-", 1)[0])


def next_id(entry_id: str) -> str:
    """The smallest stream id after ``entry_id``: an exclusive bound (``before=``) that includes it."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"
