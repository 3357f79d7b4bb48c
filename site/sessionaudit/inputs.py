"""Parsers for the values a request may carry: whole numbers, event ids, times. Stdlib only.

Every handler reads these through here, so a value that is not exactly what is asked for (a
Unicode digit such as ``²`` or ``٣``, which ``str.isdigit`` accepts and ``int`` sometimes does
too; a date before 1970 or after 9999) is one ``ValueError``, which the handlers answer with 400.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
import socket

_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)
_EVENT_ID = re.compile(r"([0-9]{1,15})(?:-([0-9]{1,19}))?", re.ASCII)
_ISO = re.compile(r"[0-9:.+\-TtZz ]{4,40}", re.ASCII)
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


MAX_WHOLE = 2**53 - 1  # what every consumer (Redis offsets and counts, JavaScript) takes exactly


def whole_number(text: str, maximum: int = MAX_WHOLE) -> int:
    """``text`` as a whole number from 0 to ``maximum`` written in ASCII digits; ValueError otherwise."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"not a whole number: {text[:40]!r}")
    value = int(text)
    if value > maximum:
        raise ValueError(f"larger than {maximum}")
    return value


def is_event_id(text: str) -> bool:
    """Whether ``text`` is a stream id (``<ms>`` or ``<ms>-<seq>``) in ASCII digits."""
    return _EVENT_ID.fullmatch(text) is not None


def is_first_event_id(text: str) -> bool:
    """Whether the stream id ``text`` is 0-0, the smallest there is: nothing comes before it."""
    return all(int(part) == 0 for part in text.split("-"))


def parse_time(text: str) -> int:
    """ISO 8601 (a date, or a date and time, with or without zone; no zone means UTC) → UTC ms.

    Only times from 1970 to 9999 are accepted; anything else raises ValueError.
    """
    text = text.strip()
    if not _ISO.fullmatch(text):
        raise ValueError("not an ISO 8601 time")
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        ms = round(moment.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        raise ValueError("time out of range") from None
    if not 0 <= ms <= MAX_TIME_MS:
        raise ValueError("times must lie between 1970 and 9999")
    return ms


@functools.lru_cache(maxsize=4096)
def canonical_ip(ip: str) -> str:
    """One spelling per address: IPv6 compressed and in lower case (without a zone), an IPv4-mapped
    IPv6 address as its IPv4 address, IPv4 in dotted decimal whatever the spelling Tornado let in."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        try:
            return socket.inet_ntoa(socket.inet_aton(ip))  # octal, hex or short IPv4 forms
        except OSError:
            return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


@functools.lru_cache(maxsize=4096)
def address_key(ip: str) -> str:
    """What counts as one address (the throttles, the check for sessions that move): IPv4 as it is,
    IPv6 by its /64 network (one client holds a whole /64), whatever the spelling."""
    ip = canonical_ip(ip)
    if ":" in ip:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return ip
