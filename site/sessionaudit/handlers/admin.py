"""Admin pages: the audit trail (page, export, timelines) and everyone's live sessions."""

from __future__ import annotations

import csv
import io
import json

import tornado.iostream
import tornado.web

from .. import events
from ..audit import BadQuery, Query
from ..sessions import list_live
from .base import BaseHandler, admin, form

EXPORT_CHUNK = 1000


class AdminHandler(BaseHandler):
    def query(self) -> Query:
        try:
            return Query.parse(lambda name: self.get_query_argument(name, None), self.ctx.settings.audit_page_max)
        except BadQuery as e:
            raise tornado.web.HTTPError(400, str(e)) from None


class DashboardHandler(AdminHandler):
    @admin
    async def get(self) -> None:
        self.redirect("/admin/audit")


class AuditHandler(AdminHandler):
    @admin
    async def get(self) -> None:
        q = self.query()
        page = await self.ctx.audit.page(q)
        self.render("admin_audit.html", q=q, page=page, types=events.TYPES)


class AuditExportHandler(AdminHandler):
    """Every matching event, newest first, streamed a chunk at a time (constant memory)."""

    def initialize(self, fmt: str) -> None:  # type: ignore[override]
        super().initialize()
        self.fmt = fmt

    @admin
    async def get(self) -> None:
        q = self.query()
        if self.fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=UTF-8")
        else:
            self.set_header("Content-Type", "application/x-ndjson; charset=UTF-8")
        self.set_header("Content-Disposition", f'attachment; filename="audit.{self.fmt}"')
        if self.fmt == "csv":
            self.write(",".join(events.CSV_COLUMNS) + "\r\n")
        try:
            async for chunk in self.ctx.audit.iterate(q, EXPORT_CHUNK):
                self.write(self._format(chunk))
                await self.flush()
        except tornado.iostream.StreamClosedError:
            return  # the client went away: stop reading Redis
        self.finish()

    def _format(self, chunk: list[events.Event]) -> str:
        if self.fmt == "ndjson":
            return "".join(json.dumps(e.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n" for e in chunk)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for e in chunk:
            row = e.to_json()
            writer.writerow([_csv_safe(row[c]) for c in events.CSV_COLUMNS])
        return buffer.getvalue()


def _csv_safe(value: object) -> str:
    """Text for a CSV cell; a leading = + - @ is quoted away so spreadsheets do not run it."""
    if value is None:
        return ""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


class SessionTimelineHandler(AdminHandler):
    @admin
    async def get(self, ref: str) -> None:
        timeline = await self.ctx.audit.session_events(ref)
        if not timeline:
            raise tornado.web.HTTPError(404)
        login = next((e for e in timeline if e.type == events.LOGIN), None)
        end = next((e for e in timeline if e.type in events.END_TYPES), None)
        self.render("admin_session.html", ref=ref, timeline=timeline, login=login, end=end)


class UserTimelineHandler(AdminHandler):
    @admin
    async def get(self, uid: str) -> None:
        user = await self.ctx.users.get(uid)
        if user is None:
            raise tornado.web.HTTPError(404)
        q = self.query()
        page = await self.ctx.audit.page(Query(user=user.email, type=q.type, before=q.before, after=q.after,
                                               limit=q.limit))
        live, _ = await list_live(self.ctx.redis, uid=uid, limit=1000)
        self.render("admin_user.html", user=user, q=q, page=page, live=live, types=events.TYPES)


class SessionsHandler(AdminHandler):
    PAGE = 50

    @admin
    async def get(self) -> None:
        email = self.get_query_argument("user", "").strip().lower()
        offset_text = self.get_query_argument("offset", "0")
        if not offset_text.isdigit():
            raise tornado.web.HTTPError(400, "offset must be a whole number.")
        offset = int(offset_text)
        uid = None
        if email:
            uid = await self.ctx.audit.uid_for(email) or "-"
        found, more = await list_live(self.ctx.redis, uid=uid, offset=offset, limit=self.PAGE)
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
        self.redirect(_back(self.get_argument("next", ""), f"/admin/users/{uid}"), status=303)


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
        self.redirect(f"/admin/users/{uid}", status=303)


def _back(target: str, default: str) -> str:
    return target if target.startswith("/admin/") and not target.startswith("//") else default
