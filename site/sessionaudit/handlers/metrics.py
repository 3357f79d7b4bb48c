"""The Prometheus listener: a separate HTTP server, off unless --metrics-port is set."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tornado.httpserver
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from ..app import Context


class MetricsHandler(tornado.web.RequestHandler):
    """``GET /metrics``: the registry of this process, with gauges read at scrape time."""

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    async def get(self) -> None:
        ctx = self.ctx
        ctx.metrics.hash_queue.set(ctx.passwords.waiting)
        ctx.metrics.followers.set(len(ctx.live.followers))
        try:
            ctx.metrics.live_sessions.set(await ctx.sessions.live_count())
        except Exception:  # Redis down: the counter says so; the scrape still answers
            ctx.metrics.redis_errors.inc()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(ctx.metrics.registry))


def metrics_app(ctx: Context) -> tornado.web.Application:
    return tornado.web.Application([(r"/metrics", MetricsHandler, {"ctx": ctx})])


def start_metrics_server(ctx: Context, address: str, port: int) -> tornado.httpserver.HTTPServer:
    server = tornado.httpserver.HTTPServer(metrics_app(ctx))
    server.listen(port, address)
    return server
