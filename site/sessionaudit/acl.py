"""Which Redis user is the site connected as: one that may trim the audit trail, or an append-only one.

With the ACL users of docs/redis-users.acl the site's user can append to and read the ``audit:*``
streams but not delete, trim or overwrite them; retention is then the job of ``server.py audit
trim`` run as the maintenance user. ``detect_mode`` tells the two cases apart at start-up so the
site can leave trimming to that job instead of failing (and logging) at every sweep.

It never deletes anything:

* Redis 7 and later: one script asks ``redis.acl_check_cmd`` whether the connected user may run
  each command of the retention script (``audit.TRIM``): XRANGE on the stream, XTRIM on the stream,
  on both kinds of index stream and on the seals, HDEL on the session-events hash. The commands are checked,
  not run. (``ACL DRYRUN``, which would answer the same, is an admin command.)
* Older Redis, or a user that may not run scripts: ``XTRIM <key> MINID 0`` on the stream and on
  one index stream of each kind. MINID 0 removes entries older than id 0-0, of which there are
  none, and an XTRIM of a missing key does not create it; Redis checks the ACL before running the
  command and answers NOPERM when it is forbidden.

Any check refused means ``"append-only"``; all allowed means ``"full"``. Other errors (Redis down,
a read-only replica) propagate: they are not an answer about permissions.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from . import keys

FULL = "full"
APPEND_ONLY = "append-only"

# What audit.TRIM calls, with key names of each kind it touches. Nothing here is run, only checked.
_CHECKS: list[list[str]] = [
    ["XRANGE", keys.AUDIT, "-", "+", "COUNT", "1"],
    ["XTRIM", keys.AUDIT, "MINID", "0"],
    ["XTRIM", keys.AUDIT_TYPE + "login", "MINID", "0"],
    ["XTRIM", keys.AUDIT_USER + "1", "MINID", "0"],
    ["XTRIM", keys.SEALS, "MINID", "0"],
    ["HDEL", keys.SESSION_EVENTS, "acl-probe"],
]

# ARGV: for each check, its number of words, then the words. Returns 1 when every check is allowed.
_PROBE = r"""
local i = 1
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  if not redis.acl_check_cmd(unpack(ARGV, i + 1, i + count)) then return 0 end
  i = i + count + 1
end
return 1
"""


async def detect_mode(redis: aioredis.Redis) -> str:
    """``"append-only"`` when the connected user cannot trim the audit trail, else ``"full"``.

    Deletes nothing (see the module docstring). Raises what Redis raises for anything but a
    permission answer, e.g. ``redis.exceptions.ConnectionError``. (The parameter shadows the
    ``redis`` package here, hence the exceptions imported by name.)
    """
    argv: list[str | int] = []
    for check in _CHECKS:
        argv += [len(check), *check]
    try:
        allowed = await redis.eval(_PROBE, 0, *argv)
    except NoPermissionError:
        pass  # may not run scripts (EVAL): probe with the commands themselves
    except ResponseError as e:
        if "acl_check_cmd" not in str(e):  # Redis before 7.0 has no redis.acl_check_cmd
            raise
    else:
        return FULL if allowed == 1 else APPEND_ONLY
    for check in _CHECKS:
        if check[0] != "XTRIM":
            continue
        try:
            await redis.execute_command(*check)
        except NoPermissionError:
            return APPEND_ONLY
    return FULL
