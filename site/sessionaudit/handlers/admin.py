"""Admin pages: the audit trail (page, export, timelines) and everyone's live sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import orjson
import tornado.iostream
import tornado.web

from .. import events, inputs, seal, views
from ..audit import BadQuery, Query
from ..live import Follower, replay
from .base import BaseHandler, admin, form, safe_next, security_log
from .reset import send_reset

EXPORT_CHUNK = 5000
SESSION_TIMELINE_CAP = 60  # about the events emit() keeps in a session's timeline index (1 KB of ids)


class AdminHandler(BaseHandler):
    def query(self) -> Query:
        try:
            return Query.parse(lambda name: self.get_query_argument(name, None), self.ctx.settings.audit_page_max)
        except BadQuery as e:
            raise tornado.web.HTTPError(400, str(e)) from None


class DashboardHandler(AdminHandler):
    """Live sessions, today's logins, recent failures, the trend over a day and a month."""

    @admin
    async def get(self) -> None:
        overview = await self.ctx.stats.overview()
        newest = await self.ctx.audit.page(Query(limit=10))
        charts = {
            "hours": views.line_chart(overview.hours.starts, overview.hours.counts, "hour"),
            "days": views.line_chart(overview.days.starts, overview.days.counts, "day"),
        }
        self.render("admin_dashboard.html", o=overview, newest=newest.events, charts=charts,
                    series=views.SERIES_STYLE, seal=self.ctx.seals.status)


class AuditHandler(AdminHandler):
    @admin
    async def get(self) -> None:
        q = self.query()
        page = await self.ctx.audit.page(q)
        self.render("admin_audit.html", q=q, page=page, types=events.TYPES, seal=self.ctx.seals.status)


class AuditExportHandler(AdminHandler):
    """Every matching event, newest first, streamed a chunk at a time (constant memory)."""

    def initialize(self, fmt: str) -> None:  # type: ignore[override]
        super().initialize()
        self.fmt = fmt

    @admin
    async def get(self) -> None:
        q = self.query()
        with_seals = self.get_query_argument("seals", "")
        if with_seals not in ("", "0", "1") or (with_seals == "1" and self.fmt != "ndjson"):
            raise tornado.web.HTTPError(400, "seals=1 goes with the NDJSON export only.")
        if self.fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=UTF-8")
        else:
            self.set_header("Content-Type", "application/x-ndjson; charset=UTF-8")
        self.set_header("Content-Disposition", f'attachment; filename="audit.{self.fmt}"')
        if self.fmt == "csv":
            self.write(",".join(events.CSV_COLUMNS) + "\r\n")
        try:
            if with_seals == "1":
                await self._export_with_seals(q)
            else:
                async for chunk in self.ctx.audit.export(q, EXPORT_CHUNK):
                    await self.write_taken(self._format(chunk))
        except (tornado.iostream.StreamClosedError, TimeoutError):
            self.request.connection.close()  # gone, or not reading: stop reading Redis for it
            return
        self.finish()

    async def _export_with_seals(self, q: Query) -> None:
        """The sealed events (up to the newest seal) with their seal lines, after a header line, so that
        ``server.py audit verify --file`` can check the export offline (see seal.with_seals)."""
        filters = q.args(after=None, limit=50)
        self.write(orjson.dumps(seal.export_header(filters), option=orjson.OPT_APPEND_NEWLINE))
        newest = await seal.newest_seal(self.ctx.redis)
        if newest is None:
            return
        before = events.next_id(newest.id)
        if q.before and seal.idkey(q.before) < seal.idkey(before):
            before = q.before
        rows = self.ctx.audit.export(dataclasses.replace(q, before=before, after=None), EXPORT_CHUNK)
        async for chunk in seal.with_seals(self.ctx.redis, rows, newest, complete=not filters):
            await self.write_taken(self._format(chunk))

    def _format(self, chunk: list[dict[str, object]]) -> bytes | str:
        if self.fmt == "ndjson":  # orjson: a tenth of the time of the json module, the export's hot spot
            return b"".join([orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in chunk])
        return "".join([",".join([csv_cell(row.get(c, 1 if c == "count" else None)) for c in events.CSV_COLUMNS])
                        + "\r\n" for row in chunk])


CSV_NEEDS_QUOTES = re.compile(r'[,;\t\r\n"]')
CSV_FORMULA_AFTER_SEPARATOR = re.compile(r"([,;\t\r\n])(?=[=+\-@\t\r])")


def csv_cell(value: object) -> str:
    """One CSV cell (RFC 4180), safe in any spreadsheet locale (OWASP "CSV injection").

    A formula at the start of the cell (= + - @, tab, carriage return) is neutralised with an
    apostrophe, and so is one right after a separator inside it: a spreadsheet in a locale that
    splits on ``;`` (or tab) ignores our quotes and starts a cell there. A cell holding a
    separator, a line break or a quote is then quoted.
    """
    if value is None:
        return ""
    text = CSV_FORMULA_AFTER_SEPARATOR.sub(r"\1'", str(value))
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    if CSV_NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


class AuditLiveHandler(AdminHandler):
    """Server-Sent Events: each new matching event as `id:` and `data:` lines; resumes by Last-Event-ID.

    Whatever is written waits until the client has taken what came before (each flush is awaited,
    with a time limit), so a follower that does not read costs at most a chunk of buffer, however
    far back it resumes. The hub ends the stream when the follower's session may no longer follow.
    """

    follower: Follower | None = None

    @admin
    async def get(self) -> None:
        assert self.current
        q = self.query()
        hub = self.ctx.live
        if hub.full():
            self.set_header("Retry-After", "10")
            raise tornado.web.HTTPError(503, "Too many followers")
        resume = self.request.headers.get("Last-Event-ID") or self.get_query_argument("last_id", "")
        if resume and not inputs.is_event_id(resume):
            raise tornado.web.HTTPError(400, "Last-Event-ID must be an event id.")
        self.set_header("Content-Type", "text/event-stream; charset=UTF-8")
        self.set_header("X-Accel-Buffering", "no")  # nginx: pass each message on at once
        self.follower = follower = await hub.attach(q, self.current.ref)
        try:
            snapshot = hub.last_id  # events after it reach the queue; up to it, the replay sends them
            last = resume or None
            self.write("retry: 2000\n: following the audit trail\n\n")
            await self.flush_taken()
            if resume:
                async for chunk in replay(self.ctx.redis, resume, q, snapshot):
                    if follower.stopped:
                        break
                    await self.write_taken("".join([_sse(event) for event in chunk]))
                    last = chunk[-1].id
            heartbeat = self.ctx.settings.live_heartbeat
            ended = follower.stopped and follower.queue.empty()
            while not ended:
                try:
                    batch = [await asyncio.wait_for(follower.queue.get(), heartbeat)]
                except TimeoutError:  # following does not count as activity: no session refresh
                    self.write(": heartbeat\n\n")
                    await self.flush_taken()
                    continue
                while not follower.queue.empty():  # everything queued goes out in one flush
                    batch.append(follower.queue.get_nowait())
                out = []
                for event in batch:
                    if event is None:  # shutdown, a closed tab, too slow, or no longer allowed
                        ended = True
                        break
                    if last is None or _id_key(event.id) > _id_key(last):
                        out.append(_sse(event))
                        last = event.id
                await self.write_taken("".join(out))
            self.finish()
        except (tornado.iostream.StreamClosedError, TimeoutError):
            self.request.connection.close()  # gone, or not reading: nothing more is kept for it
        finally:
            hub.detach(follower)

    def on_connection_close(self) -> None:
        if self.follower:
            self.follower.stop()
        super().on_connection_close()


def _sse(event: events.Event) -> str:
    return f"id: {event.id}\ndata: {orjson.dumps(event.to_json()).decode()}\n\n"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class SessionTimelineHandler(AdminHandler):
    @admin
    async def get(self, ref: str) -> None:
        timeline = await self.ctx.audit.session_events(ref)
        if not timeline:
            raise tornado.web.HTTPError(404)
        login = next((e for e in timeline if e.type == events.LOGIN), None)
        end = next((e for e in timeline if e.type in events.END_TYPES), None)
        # Each move, with where the session was used from before it: its login or the move before.
        moves, before = [], login
        for e in timeline:
            if e.type == events.SESSION_CHANGED:
                moves.append((e, before or e))
                before = e
        truncated = end is None and len(timeline) >= SESSION_TIMELINE_CAP
        self.render("admin_session.html", ref=ref, timeline=timeline, login=login, end=end, moves=moves,
                    truncated=truncated)


class UserTimelineHandler(AdminHandler):
    @admin
    async def get(self, uid: str) -> None:
        user = await self.ctx.users.get(uid)
        if user is None:
            raise tornado.web.HTTPError(404)
        q = self.query()
        page = await self.ctx.audit.page(Query(user=user.email, type=q.type, before=q.before, after=q.after,
                                               limit=q.limit))
        live, _ = await self.ctx.sessions.list_live(uid=uid, limit=1000)
        # The bars show the newest 200 events: the page itself when it is the newest and whole.
        recent = page.events
        if q.before or q.after or page.older:
            recent = (await self.ctx.audit.page(Query(user=user.email, limit=200))).events
        spans = views.session_spans(recent, self.now_ms())
        factors = await self.ctx.factors.view(uid)
        self.render("admin_user.html", user=user, q=q, page=page, live=live, types=events.TYPES, spans=spans,
                    factors=factors)


class SessionsHandler(AdminHandler):
    PAGE = 50

    @admin
    async def get(self) -> None:
        email = self.get_query_argument("user", "").strip().lower()
        try:
            offset = inputs.whole_number(self.get_query_argument("offset", "0"))
        except ValueError:
            raise tornado.web.HTTPError(400, "offset must be a whole number.") from None
        uid = None
        if email:
            uid = await self.ctx.audit.uid_for(email) or "-"
        found, more = await self.ctx.sessions.list_live(uid=uid, offset=offset, limit=self.PAGE)
        total = await self.ctx.sessions.live_count()
        self.render("admin_sessions.html", sessions=found, more=more, offset=offset, page_size=self.PAGE,
                    user=email, total=total)


class AdminRevokeHandler(AdminHandler):
    @form
    @admin
    async def post(self, ref: str) -> None:
        assert self.current
        result = await self.ctx.sessions.end(ref, events.REVOKED, reason=events.BY_ADMIN, actor=self.current.email,
                                             ip=self.client_ip, user_agent=self.user_agent)
        if result is None:
            raise tornado.web.HTTPError(404)
        security_log.warning("admin %s ended session %s", self.current.email, ref)
        if ref == self.current.ref:
            self.clear_session_cookie()
            self.redirect("/", status=303)
            return
        self.redirect(_back(self.get_argument("next", ""), "/admin/sessions"), status=303)


class AdminRevokeAllHandler(AdminHandler):
    @form
    @admin
    async def post(self, uid: str) -> None:
        assert self.current
        keep = self.current.ref if uid == self.current.uid else ""
        ended = await self.ctx.sessions.end_all(uid, events.BY_ADMIN, actor=self.current.email, ip=self.client_ip,
                                                user_agent=self.user_agent, keep=keep)
        if ended < 0:
            raise tornado.web.HTTPError(404)
        security_log.warning("admin %s ended %d session(s) of user %s", self.current.email, ended, uid)
        self.redirect(_back(self.get_argument("next", ""), f"/admin/users/{uid}"), status=303)


class MfaResetHandler(AdminHandler):
    """Remove every second factor of a user (TOTP, recovery codes, passkeys): the way back in for
    someone who lost them all. Recorded as `mfa_disabled`, reason admin, with the admin as actor."""

    @form
    @admin
    async def post(self, uid: str) -> None:
        assert self.current
        result = await self.ctx.factors.reset(uid, actor=self.current.email, ip=self.client_ip,
                                              user_agent=self.user_agent)
        if result is None:
            raise tornado.web.HTTPError(404)
        security_log.warning("admin %s: reset the second factors of user %s (%s)", self.current.email, uid, result)
        self.redirect(f"/admin/users/{uid}", status=303)


class UserFlagHandler(AdminHandler):
    """Grant or remove admin rights; disable (ending every session) or enable an account."""

    @form
    @admin
    async def post(self, uid: str, action: str) -> None:
        assert self.current
        if uid == self.current.uid and action in ("unadmin", "disable"):
            raise tornado.web.HTTPError(400, "You cannot remove your own admin rights or disable yourself.")
        ctx = self.ctx
        if action == "disable":
            ended = await ctx.sessions.end_all(uid, events.BY_ADMIN, actor=self.current.email, ip=self.client_ip,
                                               user_agent=self.user_agent, set_field="disabled", set_value="1")
            found = ended >= 0
        elif action == "enable":
            found = await ctx.users.set_flag(uid, "disabled", False) is not None
        else:
            found = await ctx.users.set_flag(uid, "admin", action == "admin") is not None
        if not found:
            raise tornado.web.HTTPError(404)
        security_log.warning("admin %s: %s user %s", self.current.email, action, uid)
        self.redirect(f"/admin/users/{uid}", status=303)


class AdminSendResetHandler(AdminHandler):
    """Mail a user a password reset link, as /password/forgot would, with the admin as the actor."""

    @form
    @admin
    async def post(self, uid: str) -> None:
        assert self.current
        user = await self.ctx.users.get(uid)
        if user is None:
            raise tornado.web.HTTPError(404)
        if user.disabled:
            raise tornado.web.HTTPError(400, "This account is disabled: enable it before sending a reset link.")
        await send_reset(self, user.email, actor=self.current.email, throttled=False)
        security_log.warning("admin %s sent a password reset link to user %s", self.current.email, uid)
        self.redirect(f"/admin/users/{uid}?reset=sent", status=303)


def _back(target: str, default: str) -> str:
    """Where an admin form returns to: a page under /admin/ (as ``safe_next`` allows it), else ``default``."""
    target = safe_next(target, default)
    return target if target.startswith("/admin/") else default
