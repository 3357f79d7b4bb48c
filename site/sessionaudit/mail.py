"""Outgoing mail: to an SMTP server (``--smtp-url``) or, without one, as ``.eml`` files in ``<data-dir>/outbox/``.

A request never waits for mail: ``submit`` puts the message on a bounded queue and returns at once,
taking the same few microseconds whoever it is for, and a few worker tasks compose and deliver it.
That keeps a password reset request for an existing account exactly as fast as one for an unknown
address. A mail server that is down or answers with a temporary error is tried again (after 5 s,
30 s and 2 min); a message it refuses for good, or still cannot take after the last try, or that
is still waiting when the site stops, is kept in the outbox with a warning naming the file, so no
message is lost silently (one that is waiting when the process is killed is lost: the person asks
again). Logs name the recipient and the file, never the body: it carries a reset link.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import jinja2

from .config import Settings, SmtpTarget, smtp_target
from .ratelog import RateLimitedLog

log = logging.getLogger("sessionaudit.mail")
_random = secrets.SystemRandom()

RETRY_DELAYS = (5.0, 30.0, 120.0)  # seconds before each further try of a temporary failure
MAX_PENDING = 1000  # messages queued or being retried; past it, new ones are dropped (counted, logged)
WORKERS = 2  # messages handed over at once
SMTP_TIMEOUT = 20.0  # seconds for one delivery attempt
JITTER = (0.02, 0.3)  # seconds: a message is delivered after a random pause in this range (see _attempt)
STOP_GRACE = 5.0  # seconds a stopping site gives queued messages before keeping them in the outbox
# Results counted in the metrics: sent (to the SMTP server), written (to the outbox: no --smtp-url),
# retry (a temporary failure), kept (undeliverable or shut down: left in the outbox), dropped (queue full).
RESULTS = ("sent", "written", "retry", "kept", "dropped")
POLICY = email.policy.SMTP  # CRLF line ends, as on the wire and in .eml files


class MailRefused(Exception):
    """The mail server refused the message for good (a 5xx answer): trying again cannot help."""


@dataclass(eq=False)
class Outgoing:
    """A message waiting to be composed and delivered."""

    to: str
    subject: str
    template: str
    context: dict[str, Any]
    decoy: bool = False  # composed like the others, then dropped: see submit()
    tries: int = 0
    message: EmailMessage | None = field(default=None, repr=False)


class Mailer:
    """Compose plain-text mail from templates and deliver it: SMTP, or the outbox when there is none.

    ``send`` delivers one message now; ``submit`` queues one for the workers. Callbacks report each
    result (see RESULTS) and the number of messages pending, for the metrics.
    """

    def __init__(self, settings: Settings, *, count: Callable[[str], None] | None = None,
                 pending: Callable[[int], None] | None = None, retry_delays: tuple[float, ...] = RETRY_DELAYS,
                 max_pending: int = MAX_PENDING, workers: int = WORKERS, timeout: float = SMTP_TIMEOUT,
                 jitter: tuple[float, float] = JITTER):
        self.target: SmtpTarget | None = smtp_target(settings.smtp_url) if settings.smtp_url else None
        self.outbox = Path(settings.data_dir) / "outbox"
        self.sender = settings.sender
        self.domain = email.utils.parseaddr(self.sender)[1].rpartition("@")[2] or "localhost"
        self.count = count or (lambda result: None)
        self.on_pending = pending or (lambda n: None)
        self.retry_delays = retry_delays
        self.max_pending = max_pending
        self.workers = workers
        self.timeout = timeout
        self.jitter = jitter
        # Plain text: nothing is HTML-escaped, and a template's last newline is kept.
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(settings.template_path),
            autoescape=False,  # noqa: S701 (text/plain mail, never shown as HTML)
            keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
        self.warnings = RateLimitedLog(log)  # retries under an outage: one line per 10 s, with a count
        self.pending = 0
        self._queue: asyncio.Queue[Outgoing] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._delayed: dict[Outgoing, asyncio.TimerHandle] = {}
        self._sending: set[Outgoing] = set()
        self._idle: asyncio.Event | None = None
        self._stopping = False

    # -- queueing ---------------------------------------------------------------------

    def submit(self, to: str, subject: str, template: str, *, decoy: bool = False, **context: Any) -> bool:
        """Queue a message (``template`` rendered with ``context``); False when the queue is full.

        Never blocks and does the same work for every message: callers answer requests without
        waiting for, or being slowed by, the mail. A ``decoy`` is composed by the same worker
        like any message, then dropped: a request that mails nothing (a reset for an unknown
        email) queues one, so even the work that follows its answer is the same.
        """
        if self._stopping or self.pending >= self.max_pending:
            if not decoy:
                self.count("dropped")
                self.warnings.warning("mail-dropped", "mail queue full (%d waiting): a message to %s was dropped",
                                      self.pending, to)
            return False
        if self._queue is None:
            self._start()
        assert self._queue is not None
        self._set_pending(self.pending + 1)
        self._queue.put_nowait(Outgoing(to, subject, template, context, decoy))
        return True

    async def idle(self) -> None:
        """Return once every queued message has been delivered or kept (tests; shutdown)."""
        while self.pending:
            assert self._idle is not None
            await self._idle.wait()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop the workers; what is still waiting after ``grace`` seconds is kept in the outbox."""
        if self._queue is None:
            return
        self._stopping = True  # from now on a failure is kept at once, not retried
        for item, timer in list(self._delayed.items()):
            timer.cancel()
            del self._delayed[item]
            self._queue.put_nowait(item)  # one last try
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        left = [*self._sending]
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        for item in left:
            if item.decoy:
                self._set_pending(self.pending - 1)
            else:
                self._keep(item, "the site stopped before it was delivered")
        self._sending.clear()
        self._queue = None

    def _start(self) -> None:
        self._queue = asyncio.Queue()
        self._idle = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]

    def _set_pending(self, n: int) -> None:
        self.pending = n
        self.on_pending(n)
        if self._idle is not None:
            if n:
                self._idle.clear()
            else:
                self._idle.set()

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            item = await queue.get()
            self._sending.add(item)
            try:
                await self._attempt(item)
            except Exception:  # a bug must not stop the worker, nor lose the message
                log.exception("mail to %s failed unexpectedly", item.to)
                self._keep(item, "an unexpected error")
            finally:
                self._sending.discard(item)

    async def _attempt(self, item: Outgoing) -> None:
        if item.message is None:
            # Composed at once, a decoy like a real message. Only a real one is then delivered, after a
            # random pause: the work that a real message alone causes is not tied in time to the
            # request that queued it, so no later request's time hints at which emails have accounts.
            item.message = self.compose(item.to, item.subject, item.template, **item.context)
            item.message.as_bytes(policy=POLICY)
            if item.decoy:
                self._set_pending(self.pending - 1)
                return
            if not self._stopping and self.jitter[1] > 0:
                self._later(_random.uniform(*self.jitter), item)
                return
        item.tries += 1
        try:
            await self.send(item.message)
        except MailRefused as e:
            self._keep(item, f"refused: {e}")
            return
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            if self._stopping or item.tries > len(self.retry_delays):
                self._keep(item, f"{_reason(e)} (after {item.tries} tries)")
                return
            delay = self.retry_delays[item.tries - 1]
            self.count("retry")
            self.warnings.warning("mail-retry", "mail to %s not delivered (%s); trying again in %.0f s",
                                  item.to, _reason(e), delay)
            self._later(delay, item)
            return
        self._set_pending(self.pending - 1)

    def _later(self, delay: float, item: Outgoing) -> None:
        self._delayed[item] = asyncio.get_running_loop().call_later(delay, self._requeue, item)

    def _requeue(self, item: Outgoing) -> None:
        self._delayed.pop(item, None)
        if self._queue is not None:
            self._queue.put_nowait(item)

    def _keep(self, item: Outgoing, why: str) -> None:
        """Give up delivering ``item``: write it to the outbox, with a warning saying where."""
        try:
            message = item.message or self.compose(item.to, item.subject, item.template, **item.context)
            path = self.write_outbox(message.as_bytes(policy=POLICY))
            log.warning("mail to %s could not be delivered: %s; kept as %s", item.to, why, path)
            self.count("kept")
        except Exception:
            log.exception("mail to %s could not be delivered (%s) nor kept in %s", item.to, why, self.outbox)
        self._set_pending(self.pending - 1)

    # -- one message ------------------------------------------------------------------

    def compose(self, to: str, subject: str, template: str, **context: Any) -> EmailMessage:
        """A plain-text message from ``templates/<template>`` (not HTML-escaped)."""
        text = self.templates.get_template(template).render(**context)
        message = EmailMessage(policy=POLICY)
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = email.utils.formatdate(usegmt=True)
        message["Message-ID"] = email.utils.make_msgid(domain=self.domain)
        message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to the site
        # ASCII text goes as it is (7bit), so a long link stays whole and readable in an .eml file.
        message.set_content(text, cte="7bit" if text.isascii() else None)
        return message

    async def send(self, message: EmailMessage) -> str:
        """Deliver one message now: to the SMTP server ("sent") or into the outbox (the file's path).

        Raises MailRefused for a permanent refusal, aiosmtplib.SMTPException or OSError otherwise.
        """
        if self.target is None:
            # A small file, not synced: written in place, which costs the IOLoop less than a hop to a thread.
            path = self.write_outbox(message.as_bytes(policy=POLICY))
            log.info("mail to %s written to %s (no --smtp-url)", message["To"], path)
            self.count("written")
            return str(path)
        t = self.target
        try:
            await aiosmtplib.send(message, hostname=t.host, port=t.port, username=t.username or None,
                                  password=t.password or None, use_tls=t.use_tls, start_tls=t.start_tls,
                                  timeout=self.timeout)
        except aiosmtplib.SMTPRecipientsRefused as e:
            raise MailRefused(_reason(e)) from None
        except aiosmtplib.SMTPResponseException as e:
            if 500 <= e.code < 600:
                raise MailRefused(_reason(e)) from None
            raise
        log.info("mail to %s handed to %s", message["To"], t.safe_url)
        self.count("sent")
        return "sent"

    def write_outbox(self, data: bytes) -> Path:
        """Write a message (its bytes) as ``<outbox>/<UTC time, µs>-<random>.eml``: mode 0600, the folder 0700.

        Written under a temporary name and renamed, so a reader never sees half a message.
        """
        try:
            self.outbox.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        now = time.time_ns() // 1000  # µs: names sort in the order the messages were written
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000))
        name = f"{stamp}.{now % 1_000_000:06d}Z-{secrets.token_hex(4)}.eml"
        tmp = self.outbox / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        path = self.outbox / name
        os.replace(tmp, path)
        return path


def _reason(error: BaseException) -> str:
    """A short description of a delivery failure (the server's answer; never our credentials)."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        return "; ".join(f"{r.code} {r.message}" for r in error.recipients) or "recipients refused"
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return f"{error.code} {error.message}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
