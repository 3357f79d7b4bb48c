"""Home, health check, favicon, and the 404 page for unknown addresses."""

from __future__ import annotations

import tornado.web

from .base import REDIS_DOWN, BaseHandler


class HomeHandler(BaseHandler):
    def get(self) -> None:
        if self.current:
            self.render("home.html")
            return
        # The same page for everyone not logged in (no form on it, so no XSRF token): rendered once.
        page = self.ctx.pages.get("home")
        if page is None:
            page = self.render_string("home.html")
            if not self.ctx.settings.debug:
                self.ctx.pages["home"] = page
        self.finish(page)


class HealthHandler(BaseHandler):
    """200 `ok` when Redis answers PING, else 503. No session, no template: cheap for probes."""

    async def prepare(self) -> None:
        pass  # no session to load

    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        try:
            await self.ctx.redis.ping()
        except REDIS_DOWN:
            self.set_status(503)
            self.finish("redis unavailable\n")
            return
        self.finish("ok")


class NotFoundHandler(BaseHandler):
    """Any address no route matches: 404 whatever the method (once a body, if any, is read).

    The session is loaded as on every page: the page's header shows who is logged in.
    """

    async def get(self, *args: str, **kwargs: str) -> None:
        self.raise_deferred()
        raise tornado.web.HTTPError(404)

    head = post = put = patch = delete = options = get
