"""argon2id hashing in a small dedicated thread pool, and the rule for acceptable passwords.

Each hash takes ``argon2_memory_cost`` KiB and tens of milliseconds of CPU: it never runs on
the IOLoop thread, the pool has one thread per core, and at most ``hash_queue`` logins wait
for it (past that, new ones get 503 instead of an ever longer wait).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import Any, TypeVar

import argon2
from zxcvbn import zxcvbn

from .config import Settings

MAX_PASSWORD_BYTES = 1024
_ZXCVBN_MAX = 72  # zxcvbn refuses longer input; the head of a long password is what guessing starts with
MIN_GUESSES_LOG10 = 6
HASH_NICE = 19  # below a million guesses: a common password, a keyboard walk, a repeat

T = TypeVar("T")


class HasherBusy(Exception):
    """Too many logins are already waiting for a hash thread."""


class Passwords:
    """argon2id hash and verify, always off the IOLoop thread."""

    def __init__(self, settings: Settings, on_hash: Callable[[float], None] | None = None):
        self.settings = settings
        self.on_hash = on_hash  # metrics: seconds of each hash or verify (called from the pool's threads)
        self.hasher = argon2.PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost,
            parallelism=settings.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self.threads = settings.hash_threads
        self.executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="argon2",
                                                              initializer=_lower_priority)
        self.waiting = 0  # calls submitted and not finished
        # Verifying against this costs the same as verifying a real hash: an unknown email
        # takes as long as a wrong password.
        self._dummy = self.hasher.hash("not a password: only here to spend the time of a verify")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.waiting >= self.threads + self.settings.hash_queue:
            raise HasherBusy()
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.waiting -= 1

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._took(time.perf_counter() - start)

    def _took(self, seconds: float) -> None:
        if self.on_hash:
            self.on_hash(seconds)

    async def verify(self, stored_hash: str | None, password: str) -> tuple[bool, str | None]:
        """Check ``password``; return (ok, new hash when the stored one needs a rehash, else None).

        With ``stored_hash`` None (no such user) the dummy hash is verified, so the answer takes
        the same time.
        """
        return await self._run(self._verify_sync, stored_hash, password)

    def _verify_sync(self, stored_hash: str | None, password: str) -> tuple[bool, str | None]:
        start = time.perf_counter()
        try:
            try:
                self.hasher.verify(stored_hash or self._dummy, password)
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False, None
            if stored_hash is None:
                return False, None
            if self.hasher.check_needs_rehash(stored_hash):
                return True, self.hasher.hash(password)
            return True, None
        finally:
            self._took(time.perf_counter() - start)

    async def check_and_hash(self, password: str, email: str) -> tuple[str | None, str | None]:
        """Check a new password, then hash it, in one trip to the pool: (error, hash)."""
        return await self._run(self._check_and_hash_sync, password, email)

    def _check_and_hash_sync(self, password: str, email: str) -> tuple[str | None, str | None]:
        error = password_problem(password, email, self.settings.password_min_length)
        if error:
            return error, None
        return None, self._timed(self.hasher.hash, password)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """Run this hashing thread (and argon2's lane threads, which inherit it) at the lowest priority.

    On a busy core the IOLoop thread then always comes first: a page never waits behind a hash;
    logins take what CPU the pages leave. Linux's SCHED_IDLE (per thread) gives way at once when
    the IOLoop wakes; at nice 19 (where SCHED_IDLE is not to be had) the IOLoop could wait for the
    scheduler's next turn, a few milliseconds.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        return
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICE)
    except (OSError, AttributeError):
        pass


def password_problem(password: str, email: str, min_length: int) -> str | None:
    """Why ``password`` is not acceptable, or None. NIST SP 800-63B-4 / ASVS 6.2.

    Length counts characters (after NFKC, so a composed and a decomposed accent count alike);
    no composition rules; at least 64 characters are always allowed (up to 1,024 bytes); the
    password is checked against common passwords and guessable patterns (zxcvbn's lists) and
    against the email address.
    """
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        return f"Passwords can be at most {MAX_PASSWORD_BYTES} bytes long."
    normalized = unicodedata.normalize("NFKC", password)
    if len(normalized) < min_length:
        return f"Use at least {min_length} characters."
    local = email.split("@", 1)[0].lower()
    lowered = normalized.lower()
    if lowered == email.lower() or (len(local) >= 4 and local in lowered and len(lowered) - len(local) < min_length):
        return "Your password must not be based on your email address."
    result = zxcvbn(normalized[:_ZXCVBN_MAX], user_inputs=[email, local, "sessionaudit", "session", "audit"])
    if result["guesses_log10"] < MIN_GUESSES_LOG10:
        return "This password is too common or too easy to guess; a few unrelated words make a good one."
    return None
