"""The baselines of the authenticated-page benchmark, each run as its own server process.

  floor  the least a Tornado + Redis session page can do: check a Tornado signed cookie, one GETEX
         (read the session and slide its TTL in one command) and render a ~1 KB Jinja2 page
  hello  a plain Tornado handler writing a short text: the cost of Tornado's HTTP code alone

Both use the same event loop as the site (uvloop when installed) and redis-py's asyncio client
(with hiredis when installed), so the difference to the site is the site's own work.

The floor's session lives at ``floor:s:<id>`` as JSON (uid, email, created, ip, ua); the bench
writes it and mints the cookie with COOKIE_SECRET.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import jinja2
import redis.asyncio as aioredis
import tornado.web

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Your account · Session Audit</title>
<link rel="stylesheet" href="/static/site.css"></head>
<body>
<header class="top"><nav aria-label="Main"><a class="brand" href="/">Session Audit</a>
<ul><li><a href="/account">Account</a></li><li><span class="who">{{ s.email }}</span></li></ul></nav></header>
<main id="main" class="wide">
<h1>Your account</h1>
<dl class="facts"><dt>Email</dt><dd>{{ s.email }}</dd><dt>Signed in</dt><dd>{{ s.created }}</dd></dl>
<table><thead><tr><th>Device</th><th>Address</th><th>Last seen</th></tr></thead>
<tbody><tr class="this"><td><span title="{{ s.ua }}">{{ s.ua[:40] }}</span></td><td>{{ s.ip }}</td>
<td>{{ s.created }}</td></tr></tbody></table>
<p><a href="/account/password">Change your password</a></p>
</main>
<footer class="foot"><p>Every sign-in, sign-out and expiry is recorded.</p></footer>
</body>
</html>
"""

IDLE_SECONDS = 1800


class FloorHandler(tornado.web.RequestHandler):
    async def get(self) -> None:
        session_id = self.get_signed_cookie("sid", min_version=2, max_age_days=31)
        if session_id is None:
            self.redirect("/login")
            return
        data = await self.application.redis.getex(b"floor:s:" + session_id, ex=IDLE_SECONDS)  # type: ignore[attr-defined]
        if data is None:
            self.redirect("/login")
            return
        self.write(self.application.page.render(s=json.loads(data)))  # type: ignore[attr-defined]


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("Hello, world")


async def serve(mode: str, port: int, redis_url: str) -> None:
    if mode == "floor":
        app = tornado.web.Application([(r"/floor", FloorHandler)], cookie_secret=os.environ["COOKIE_SECRET"])
        app.redis = aioredis.Redis.from_url(redis_url)  # type: ignore[attr-defined]
        app.page = jinja2.Environment(autoescape=True).from_string(PAGE)  # type: ignore[attr-defined]
    else:
        app = tornado.web.Application([(r"/hello", HelloHandler)])
    app.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("floor", "hello"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(serve(args.mode, args.port, args.redis_url))


if __name__ == "__main__":
    main()
