"""Accounts: a user hash and an email index, created with their `register` event in one script."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import email_validator
import redis.asyncio as aioredis

from . import keys

REGISTER = r"""
local now, email, hash, admin, ip, ua = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local taken = redis.call('HGET', 'sa:emails', email)
if taken then
  -- Taken by this very registration when it runs twice (a client retrying after a lost reply):
  -- its password hash, salted afresh for each attempt, tells.
  if redis.call('HGET', 'sa:user:' .. taken, 'hash') == hash then return taken end
  return false
end
local uid = tostring((tonumber(redis.call('GET', 'sa:user:next')) or 0) + 1)
emit(now, {t = 'register', u = uid, e = email, i = ip, g = ua})
redis.call('SET', 'sa:user:next', uid)
redis.call('HSET', 'sa:emails', email, uid)
redis.call('HSET', 'sa:user:' .. uid, 'id', uid, 'email', email, 'hash', hash, 'admin', admin,
           'created', ARGV[1], 'disabled', '0')
return uid
"""

# Change one flag of a user; returns the user's email, or false when there is no such user.
SET_FLAG = r"""
local uid, field, value = ARGV[2], ARGV[3], ARGV[4]
local email = redis.call('HGET', 'sa:user:' .. uid, 'email')
if not email then return false end
redis.call('HSET', 'sa:user:' .. uid, field, value)
return email
"""

# The first admin among users ARGV[1]..ARGV[2] (ids), or false.
FIND_ADMIN = r"""
for uid = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  if redis.call('HGET', 'sa:user:' .. uid, 'admin') == '1' then return tostring(uid) end
end
return false
"""


class InvalidEmail(ValueError):
    """The address is not a valid email address."""


@dataclass(frozen=True)
class User:
    id: str
    email: str
    password_hash: str
    admin: bool
    created: int  # ms
    disabled: bool

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> User:
        def get(name: str) -> str:
            return h.get(name.encode(), b"").decode()

        return cls(id=get("id"), email=get("email"), password_hash=get("hash"), admin=get("admin") == "1",
                   created=int(get("created") or 0), disabled=get("disabled") == "1")


@functools.lru_cache(maxsize=4096)
def normalize_email(address: str) -> str:
    """Validate and normalise an address (no DNS look-up); raise InvalidEmail with a readable message.

    The domain is lower-cased and IDNA-normalised by email-validator; the local part is
    lower-cased too, so Alice@Example.com and alice@example.com are one account.
    """
    address = address.strip()
    if len(address) > 254:
        raise InvalidEmail("That email address is too long.")
    try:
        result = email_validator.validate_email(address, check_deliverability=False)
    except email_validator.EmailNotValidError as e:
        raise InvalidEmail(str(e)) from None
    return result.normalized.lower()


class UserStore:
    """Create and read accounts. Takes the Redis client and a clock (seconds) in."""

    def __init__(self, redis: aioredis.Redis, clock: Callable[[], float],
                 count: Callable[[str, int], None] | None = None):
        self.redis = redis
        self.clock = clock
        self.count = count or (lambda kind, n: None)  # metrics: events appended, by type
        self.scripts = keys.Scripts(redis, register=REGISTER, set_flag=SET_FLAG, find_admin=FIND_ADMIN,
                                    acked={"register", "set_flag"})

    async def create(self, email: str, password_hash: str, *, admin: bool = False,
                     ip: str = "", user_agent: str = "") -> str | None:
        """Create the account and its `register` event; None when the email is taken."""
        now = int(self.clock() * 1000)
        uid = await self.scripts.register(args=[now, email, password_hash, "1" if admin else "0", ip, user_agent])
        if not uid:
            return None
        self.count("register", 1)
        return uid.decode()

    async def get(self, uid: str) -> User | None:
        h = await self.redis.hgetall(keys.USER + uid)
        return User.from_hash(h) if h else None

    async def get_by_email(self, email: str) -> User | None:
        uid = await self.redis.hget(keys.EMAILS, email)
        return await self.get(uid.decode()) if uid else None

    async def any_admin(self, batch: int = 1000) -> bool:
        """Whether any account is an admin (for the hint at start).

        Looks through the users in the order they were created, a batch per round trip, and stops
        at the first admin: usually the first user, so one round trip.
        """
        last = int(await self.redis.get(keys.USER_NEXT) or 0)
        for start in range(1, last + 1, batch):
            if await self.scripts.find_admin(args=[start, min(start + batch - 1, last)]):
                return True
        return False

    async def set_flag(self, uid: str, name: str, value: bool) -> str | None:
        """Set ``admin`` or ``disabled``; the user's email, or None when there is no such user."""
        email = await self.scripts.set_flag(args=[0, uid, name, "1" if value else "0"])
        return email.decode() if email else None
