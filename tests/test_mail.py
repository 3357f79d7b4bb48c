"""Mail: a real SMTP server (aiosmtpd) receives the reset mail; the outbox without one; a server that is down,
refuses or answers "later"; the queue's bound; a clean stop; credentials that stay out of logs."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from conftest import Browser, serving, test_settings
from sessionaudit import config
from sessionaudit.app import make_app
from sessionaudit.cli import log_mail_setup
from sessionaudit.mail import Mailer
from sessionaudit.redis_server import free_port

LINK = re.compile(r"(https?://[^/\s]+)/password/reset/([A-Za-z0-9_-]{43})")
CONTEXT = {"email": "ann@example.com", "link": "https://x.example/password/reset/" + "a" * 43, "minutes": 30,
           "ip": "192.0.2.1", "at": "2026-11-30 12:00", "actor": ""}


class Inbox:
    """An aiosmtpd handler that keeps what it receives; ``answers`` scripts its replies to DATA."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []
        self.logins: list[tuple[bytes, bytes]] = []
        self.answers: list[str] = []  # e.g. ["451 4.3.0 try later"]: used up one per DATA, then 250
        self.refuse: set[str] = set()  # recipients answered with 550
        self.received = threading.Event()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.answers:
            return self.answers.pop(0)
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        self.received.set()
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        self.logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"p@ss:w/rd")


@pytest.fixture
def smtp() -> Any:
    """A real SMTP server on a free port (no TLS; AUTH allowed without it, for the test only)."""
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port(), authenticator=inbox.authenticate,
                            auth_require_tls=False)
    controller.start()
    inbox.port = controller.port  # type: ignore[attr-defined]
    yield inbox
    controller.stop()


@pytest.fixture
def mailers(io_loop: Any) -> Any:
    """Make Mailers (settings, then Mailer's keyword arguments); each is stopped after the test."""
    made: list[Mailer] = []

    def make(settings: config.Settings, **kw: Any) -> Mailer:
        made.append(Mailer(settings, **kw))
        return made[-1]

    yield make
    for mailer in made:
        io_loop.run_sync(mailer.stop)


def mail_settings(tmp_path: Path, **overrides: Any) -> config.Settings:
    return test_settings(data_dir=str(tmp_path), **overrides)


def sample(registry: Any, result: str) -> float:
    return registry.get_sample_value("sessionaudit_mail_total", {"result": result}) or 0.0


def outbox_files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "outbox"
    return sorted(folder.glob("*.eml")) if folder.is_dir() else []


@pytest.mark.gen_test
async def test_the_reset_mail_reaches_a_real_smtp_server(smtp: Inbox, rdb, clock, tmp_path: Path) -> None:
    s = mail_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{smtp.port}", public_url="https://accounts.example.org",
                      mail_from="Accounts <accounts@example.org>")
    app = make_app(s, rdb, clock)
    async with serving(app) as url:
        import tornado.httpclient
        b = Browser(tornado.httpclient.AsyncHTTPClient(), url)
        await b.register("ann@example.com")
        # A forged Host header changes nothing: links use --public-url.
        r = await b.post("/password/forgot", {"email": "Ann@Example.com"}, headers={"Host": "evil.example"})
        assert r.code == 200
        await app.ctx.mailer.idle()
        assert len(smtp.messages) == 1
        sender, recipients, message = smtp.messages[0]
        assert (sender, recipients) == ("accounts@example.org", ["ann@example.com"])
        assert message["From"] == "Accounts <accounts@example.org>" and message["Subject"]
        assert message["Auto-Submitted"] == "auto-generated"
        body = message.get_content()
        origin, token = LINK.search(body).groups()
        assert origin == "https://accounts.example.org"
        assert "ann@example.com" in body and "30 minutes" in body and "127.0.0.1" in body
        assert "&" not in body and "&#" not in body  # plain text: nothing HTML-escaped
        assert (await b.get("/password/reset/" + token)).code == 200
        assert sample(app.ctx.metrics.registry, "sent") == 1
        assert not outbox_files(tmp_path)
        # An unknown email: the same answer, no mail.
        assert (await b.post("/password/forgot", {"email": "nobody@example.org"})).code == 200
        await app.ctx.mailer.idle()
        assert len(smtp.messages) == 1


@pytest.mark.gen_test
async def test_credentials_reach_the_server_and_no_log(mailers, smtp: Inbox, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    s = mail_settings(tmp_path, smtp_url=f"smtp://site%40example.org:p%40ss%3Aw%2Frd@127.0.0.1:{smtp.port}")
    mailer = mailers(s, jitter=(0, 0))
    log_mail_setup(s, mailer)
    mailer.submit("ann@example.com", "Hello", "mail/password_reset.txt", **CONTEXT)
    await mailer.idle()
    await mailer.stop()
    assert smtp.logins == [(b"site@example.org", b"p@ss:w/rd")] and len(smtp.messages) == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "smtp://site@example.org:***@127.0.0.1" in text
    assert "p@ss" not in text and "p%40ss" not in text
    assert "p@ss" not in repr(mailer.target) and "p%40ss" not in repr(s)


@pytest.mark.gen_test
async def test_without_smtp_each_message_is_a_private_file_in_the_outbox(mailers, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    mailer = mailers(mail_settings(tmp_path), jitter=(0, 0))
    mailer.submit("ann@example.com", "Hello", "mail/password_reset.txt", **CONTEXT)
    mailer.submit("bo@example.com", "Hello", "mail/password_reset.txt", **CONTEXT)
    await mailer.idle()
    files = outbox_files(tmp_path)
    assert len(files) == 2
    assert stat.S_IMODE((tmp_path / "outbox").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    message = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert message["To"] == "ann@example.com" and CONTEXT["link"] in message.get_content()
    assert CONTEXT["link"].encode() in files[0].read_bytes()  # 7bit: the link reads as it is in the file
    lines = [r.getMessage() for r in caplog.records if "written to" in r.getMessage()]
    assert len(lines) == 2 and str(files[0]) in lines[0]
    assert not any(CONTEXT["link"] in r.getMessage() for r in caplog.records)  # the log says where, never what
    assert not list((tmp_path / "outbox").glob(".*"))  # no temporary file left


@pytest.mark.gen_test
async def test_a_server_that_is_down_is_tried_again_then_the_message_is_kept(mailers, tmp_path: Path, caplog) -> None:
    s = mail_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{free_port()}")  # nothing listens there
    counts: list[str] = []
    mailer = mailers(s, count=counts.append, retry_delays=(0.01, 0.02), jitter=(0, 0), timeout=2)
    mailer.submit("ann@example.com", "Hello", "mail/password_reset.txt", **CONTEXT)
    await mailer.idle()
    assert counts == ["retry", "retry", "kept"]
    files = outbox_files(tmp_path)
    assert len(files) == 1 and CONTEXT["link"].encode() in files[0].read_bytes()
    kept = [r for r in caplog.records if "could not be delivered" in r.getMessage()]
    assert len(kept) == 1 and kept[0].levelno == logging.WARNING and str(files[0]) in kept[0].getMessage()
    assert "after 3 tries" in kept[0].getMessage()


@pytest.mark.gen_test
async def test_the_user_sees_the_same_answer_when_the_server_is_down(mailers, browser: Browser, app,
                                                                     tmp_path: Path) -> None:
    s = mail_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{free_port()}")
    app.ctx.mailer = mailers(s, count=app.ctx.metrics.mail_result, retry_delays=(0.01,), jitter=(0, 0), timeout=2)
    await browser.register("ann@example.com")
    r = await browser.post("/password/forgot", {"email": "ann@example.com"})
    assert r.code == 200 and b"is on its way" in r.body
    await app.ctx.mailer.idle()
    assert sample(app.ctx.metrics.registry, "retry") == 1 and sample(app.ctx.metrics.registry, "kept") == 1
    assert len(outbox_files(tmp_path)) == 1


@pytest.mark.gen_test
async def test_a_refusal_is_kept_at_once_and_a_temporary_failure_is_tried_again(mailers, smtp: Inbox,
                                                                                tmp_path: Path) -> None:
    s = mail_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{smtp.port}")
    counts: list[str] = []
    mailer = mailers(s, count=counts.append, retry_delays=(0.01, 0.01), jitter=(0, 0))
    smtp.refuse.add("gone@example.com")
    mailer.submit("gone@example.com", "Hello", "mail/password_reset.txt", **CONTEXT)
    await mailer.idle()
    assert counts == ["kept"] and len(outbox_files(tmp_path)) == 1  # 550: trying again cannot help
    smtp.answers.append("451 4.3.0 try again later")
    mailer.submit("ann@example.com", "Hello", "mail/password_reset.txt", **CONTEXT)
    await mailer.idle()
    assert counts == ["kept", "retry", "sent"]
    assert [to for _, to, _ in smtp.messages] == [["ann@example.com"]]
    await mailer.stop()


@pytest.mark.gen_test
async def test_stopping_keeps_what_is_still_waiting(mailers, tmp_path: Path) -> None:
    s = mail_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{free_port()}")
    counts: list[str] = []
    mailer = mailers(s, count=counts.append, retry_delays=(3600.0,), jitter=(0, 0), timeout=2)
    mailer.submit("ann@example.com", "Hello", "mail/password_reset.txt", **CONTEXT)
    for _ in range(500):  # until the first try has failed (the next is an hour away)
        if "retry" in counts:
            break
        await asyncio.sleep(0.01)
    await mailer.stop(grace=1)
    assert counts[-1] == "kept" and len(outbox_files(tmp_path)) == 1
    assert mailer.pending == 0


@pytest.mark.gen_test
async def test_the_queue_is_bounded(mailers, tmp_path: Path) -> None:
    s = mail_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{free_port()}")
    counts: list[str] = []
    mailer = mailers(s, count=counts.append, max_pending=3, retry_delays=(3600.0,), jitter=(0, 0), timeout=2)
    accepted = [mailer.submit(f"u{i}@example.com", "Hello", "mail/password_reset.txt", **CONTEXT) for i in range(5)]
    assert accepted == [True, True, True, False, False] and counts == ["dropped", "dropped"]
    assert not mailer.submit("x@example.com", "Hello", "mail/password_reset.txt", decoy=True, **CONTEXT)
    assert counts == ["dropped", "dropped"]  # a decoy that finds the queue full is not counted
    await mailer.stop(grace=0.5)
    assert len(outbox_files(tmp_path)) == 3  # nothing accepted is lost


@pytest.mark.gen_test
async def test_a_decoy_is_composed_and_never_delivered(mailers, smtp: Inbox, tmp_path: Path) -> None:
    counts: list[str] = []
    mailer = mailers(mail_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{smtp.port}"), count=counts.append)
    assert mailer.submit("nobody@example.com", "Hello", "mail/password_reset.txt", decoy=True, **CONTEXT)
    await mailer.idle()
    await mailer.stop()
    assert counts == [] and smtp.messages == [] and not outbox_files(tmp_path)


@pytest.mark.parametrize("url,expected", [
    ("smtp://mail.example.org", ("mail.example.org", 25, "", "", False, False)),
    ("smtp://mail.example.org:2525", ("mail.example.org", 2525, "", "", False, False)),
    ("smtp://u:s3cret@mail.example.org?starttls=1", ("mail.example.org", 587, "u", "s3cret", False, True)),
    ("smtps://a%40b.c:p%3A%2Fs3cret@mail.example.org", ("mail.example.org", 465, "a@b.c", "p:/s3cret", True, False)),
])
def test_smtp_urls(url: str, expected: tuple) -> None:
    t = config.smtp_target(url)
    assert (t.host, t.port, t.username, t.password, t.use_tls, t.start_tls) == expected
    assert "s3cret" not in t.safe_url and "s3cret" not in repr(t)


@pytest.mark.parametrize("url", ["http://mail.example.org", "smtp://", "smtp://h:notaport", "smtp://h?tls=1",
                                 "smtps://h?starttls=1", "smtp://h/path", "smtp://u:secret@h?starttls=yes"])
def test_bad_smtp_urls_are_refused_at_start_without_echoing_them(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        config.Settings(smtp_url=url).validate()
    assert "secret" not in str(refused.value)
