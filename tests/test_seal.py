"""Tamper evidence: seals, the copy outside Redis, and verification that names what changed.

Each kind of tampering of issue 11 is done the way someone with Redis access would do it (XDEL,
HSET on a user-agent dictionary, a rewritten copy RENAMEd over the trail, XTRIM, FLUSHALL) and must
be detected and named; intact trails, trimmed trails and rotated keys must verify.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from conftest import Browser, read_events, register_admin, serving, test_settings
from sessionaudit import keys, seal
from sessionaudit.app import make_app
from sessionaudit.audit import AuditLog

pytestmark = pytest.mark.gen_test(timeout=30)


async def add_events(app: Any, clock: Any, n: int, tag: str = "u") -> list[str]:
    """``n`` registrations (one event each), a second apart; their ids."""
    before = {e.id for e in await read_events(app.ctx.redis)}
    for k in range(n):
        await app.ctx.users.create(f"{tag}{k}@example.com", "x", ip=f"10.0.0.{k}", user_agent=f"Agent/{k % 2}")
        clock.advance(1)
    return [e.id for e in await read_events(app.ctx.redis) if e.id not in before]


async def sealed_trail(app: Any, clock: Any, batches: tuple[int, ...] = (3, 4, 3), tag: str = "b") -> list[list[str]]:
    """Events sealed in batches of the given sizes; their ids by batch."""
    out = []
    for b, n in enumerate(batches):
        out.append(await add_events(app, clock, n, tag=f"{tag}{b}-"))
        assert await app.ctx.seals.seal_once() == n
    return out


async def verify(app: Any, clock: Any, **kw: Any) -> seal.Report:
    kw.setdefault("retention_days", 365)
    return await seal.verify_redis(app.ctx.redis, app.ctx.seals.keys, now_ms=int(clock() * 1000), **kw)


async def rewrite(rdb: aioredis.Redis, change: Any) -> None:
    """Copy the trail with a change and RENAME the copy over it (what an admin with redis-cli could do)."""
    entries = [(i.decode(), f) for i, f in await rdb.xrange(keys.AUDIT)]
    await rdb.delete("audit:copy")
    for ident, fields in change(entries):
        await rdb.xadd("audit:copy", fields, id=ident)
    await rdb.rename("audit:copy", keys.AUDIT)


def only(report: seal.Report) -> seal.Problem:
    assert report.problems, "nothing was detected"
    return report.problems[0]


async def test_an_intact_trail_verifies_and_the_key_is_nowhere_in_redis(app, rdb, clock, settings) -> None:
    batches = await sealed_trail(app, clock)
    report = await verify(app, clock)
    assert report.ok, report.problems
    assert (report.events, report.seals, report.unsealed) == (10, 3, 0)
    assert report.verified is not None and report.verified.id == batches[-1][-1] and report.verified.total == 10
    found = [seal.Seal.from_entry(i, f) for i, f in await rdb.xrange(keys.SEALS)]
    assert [s.id for s in found] == [b[-1] for b in batches]  # a seal's id is its last event's
    assert [len(s.digests) for s in found] == [8 * len(b) for b in batches]
    assert [s.key for s in found] == ["c1"] * 3
    # Nothing sealed twice: a second call finds nothing new.
    assert await app.ctx.seals.seal_once() == 0
    # The key (and the secret it comes from) never reach Redis.
    key = settings.derived_key(seal.LABEL, 1)
    secret = settings.cookie_secret[1].encode()
    for name in await rdb.keys("*"):
        kind = await rdb.type(name)
        if kind == b"stream":
            blobs = [v for _, f in await rdb.xrange(name) for v in f.values()]
        elif kind == b"hash":
            blobs = list((await rdb.hgetall(name)).values())
        elif kind == b"string":
            blobs = [await rdb.get(name)]
        else:
            continue
        for blob in blobs:
            assert key not in blob and key.hex().encode() not in blob and secret not in blob, name


async def test_unsealed_events_are_reported_and_sealed_within_one_call(app, clock) -> None:
    await sealed_trail(app, clock, (2,))
    newer = await add_events(app, clock, 3, tag="late")
    report = await verify(app, clock)
    assert report.ok and report.unsealed == 3 and report.unsealed_from == newer[0]
    assert await app.ctx.seals.seal_once() == 3
    assert (await verify(app, clock)).unsealed == 0


async def test_deleting_an_event_is_named(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    victim = batches[1][1]
    await rdb.xdel(keys.AUDIT, victim)
    problem = only(await verify(app, clock))
    assert problem.kind == seal.DELETED and problem.event == victim and victim in problem.message


async def test_deleting_an_event_that_no_index_names_is_still_placed(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    victim = batches[1][1]
    await rdb.xdel(keys.AUDIT, victim)
    await rdb.xdel(keys.AUDIT_TYPE + "register", victim)  # a careful attacker cleans the index too
    problem = only(await verify(app, clock))
    assert problem.kind == seal.DELETED
    assert f"after event {batches[1][0]} and before event {batches[1][2]}" in problem.message


async def test_deleting_the_last_event_of_a_batch_names_it(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    victim = batches[0][-1]
    await rdb.xdel(keys.AUDIT, victim)
    await rdb.xdel(keys.AUDIT_TYPE + "register", victim)
    problem = only(await verify(app, clock))
    assert problem.kind == seal.DELETED and problem.event == victim


async def test_altering_a_field_is_named(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    victim = batches[2][0]

    def change(entries: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        return [(i, {**f, b"i": b"203.0.113.9"} if i == victim else f) for i, f in entries]

    await rewrite(rdb, change)
    problem = only(await verify(app, clock))
    assert problem.kind == seal.ALTERED and problem.event == victim


async def test_altering_a_user_agent_text_is_named(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    first_with_agent_1 = batches[0][1]  # Agent/1: the second event of every batch
    code = (await rdb.xrange(keys.AUDIT, first_with_agent_1, first_with_agent_1))[0][1][b"g"]
    await rdb.hset(keys.agents_key(first_with_agent_1), code, "Innocent/1.0")
    problem = only(await verify(app, clock))
    assert problem.kind == seal.ALTERED and problem.event == first_with_agent_1


async def test_inserting_a_forged_event_is_named(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    after = batches[1][1]
    ms, seq = after.split("-")
    forged = f"{ms}-{int(seq) + 1}"

    def change(entries: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        out = []
        for i, f in entries:
            out.append((i, f))
            if i == after:
                out.append((forged, {**f, b"e": b"alibi@example.com"}))
        return out

    await rewrite(rdb, change)
    problem = only(await verify(app, clock))
    assert problem.kind == seal.INSERTED and problem.event == forged


async def test_reordering_through_a_copy_is_named(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    a, b = batches[1][0], batches[1][1]

    def change(entries: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        fields = dict(entries)
        return [(i, fields[b] if i == a else fields[a] if i == b else f) for i, f in entries]

    await rewrite(rdb, change)
    problem = only(await verify(app, clock))
    assert problem.event == a and problem.kind in (seal.ALTERED, seal.REORDERED)


async def test_cutting_off_the_newest_events_with_their_seals_is_caught_by_the_outside_copy(app, rdb, clock,
                                                                                           tmp_path) -> None:
    copy = seal.OutsideCopy(tmp_path / seal.OUTSIDE_NAME)
    app.ctx.seals.outside = copy
    batches = await sealed_trail(app, clock)
    await app.ctx.seals.follow_once()
    recorded = copy.read()
    assert recorded is not None and recorded.id == batches[-1][-1] and recorded.total == 10
    # Remove the last batch and its seal together (XTRIM cannot cut the newest: copy and rename).
    cut = set(batches[-1])
    await rewrite(rdb, lambda entries: [(i, f) for i, f in entries if i not in cut])
    await rdb.xdel(keys.SEALS, batches[-1][-1])
    assert (await verify(app, clock)).ok  # without the outside copy nothing is wrong in Redis alone
    problem = only(await verify(app, clock, outside=copy.read()))
    assert problem.kind == seal.CUT_OFF and batches[-1][-1] in problem.message and "shorter" in problem.message
    # The site keeps sealing new events, but never overwrites the evidence with a chain that does not extend it.
    await add_events(app, clock, 2, tag="after")
    assert await app.ctx.seals.seal_once() == 2
    await app.ctx.seals.follow_once()
    assert copy.read() == recorded
    assert app.ctx.seals.status.state == "failed" and app.ctx.seals.status.problem.kind == seal.CUT_OFF


async def test_wiping_redis_is_caught_by_the_outside_copy(app, rdb, clock, tmp_path) -> None:
    copy = seal.OutsideCopy(tmp_path / seal.OUTSIDE_NAME)
    app.ctx.seals.outside = copy
    batches = await sealed_trail(app, clock)
    await app.ctx.seals.follow_once()
    await rdb.flushall()
    problem = only(await verify(app, clock, outside=copy.read()))
    assert problem.kind == seal.CUT_OFF and "holds no seal" in problem.message
    # A new trail grows and is sealed from the start: still not the chain the copy recorded.
    fresh = make_app(app.ctx.settings, rdb, clock)
    await add_events(fresh, clock, 12, tag="new")
    assert await fresh.ctx.seals.seal_once() == 12
    problem = only(await verify(fresh, clock, outside=copy.read()))
    assert problem.kind == seal.CUT_OFF and batches[-1][-1] in problem.message
    fresh.ctx.close()


async def test_a_missing_or_altered_seal_is_named(app, rdb, clock) -> None:
    batches = await sealed_trail(app, clock)
    entries = await rdb.xrange(keys.SEALS)
    middle = batches[1][-1]
    await rdb.xdel(keys.SEALS, middle)
    problem = only(await verify(app, clock))
    assert problem.kind == seal.SEALS_MISSING and batches[2][-1] in problem.message
    assert problem.message.startswith(f"4 event(s) after {batches[0][-1]}")
    # Put it back with another chain value: its events still match their digests, the seal does not.
    await rdb.delete(keys.SEALS)
    for i, f in entries:
        await rdb.xadd(keys.SEALS, {**f, b"m": bytes(32)} if i.decode() == middle else f, id=i)
    problem = only(await verify(app, clock))
    assert problem.kind == seal.SEAL_ALTERED and problem.seal == middle
    # A seal that is not a seal at all.
    await rdb.xadd(keys.SEALS, {"k": "c1", "t": "x"}, id=f"{batches[2][-1].split('-')[0]}-99")
    assert any(p.kind == seal.SEAL_ALTERED and "malformed" in p.message for p in (await verify(app, clock)).problems)


async def test_retention_leaves_a_sealed_marker_and_the_trimmed_trail_verifies(app, rdb, clock) -> None:
    old = await sealed_trail(app, clock, (3, 2))
    clock.advance(10 * 86400)
    new = await sealed_trail(app, clock, (2,), tag="new")
    audit: AuditLog = app.ctx.audit
    cutoff = int((clock() - 5 * 86400) * 1000)
    assert await audit.trim_step(cutoff, batch=1) == 3  # whole batches only: at least one
    assert await audit.trim_step(cutoff) == 2
    assert await audit.trim_step(cutoff) == 0
    assert [e.id for e in await read_events(rdb)] == new[0]
    marker = seal.Seal.from_entry(*(await rdb.xrange(keys.SEALS))[0])
    assert marker.id == old[1][-1] and marker.total == 5  # the last removed batch's seal stays
    assert await rdb.xlen(keys.SEALS) == 2
    report = await verify(app, clock, retention_days=5)
    assert report.ok and report.removed == 5 and report.events == 2 and report.marker == marker
    # Verified with a longer retention, the same trail was trimmed too early.
    assert only(await verify(app, clock, retention_days=30)).kind == seal.EARLY_TRIM
    # Deleting the oldest kept event after a trim is still named.
    await rdb.xdel(keys.AUDIT, new[0][0])
    problem = only(await verify(app, clock, retention_days=5))
    assert problem.kind == seal.DELETED and problem.event == new[0][0]


async def test_retention_never_removes_events_not_sealed_yet(app, rdb, clock) -> None:
    await add_events(app, clock, 3)
    clock.advance(10 * 86400)
    assert await app.ctx.audit.trim_step(int(clock() * 1000)) == 0
    assert await rdb.xlen(keys.AUDIT) == 3


async def test_key_rotation(app, rdb, clock, settings) -> None:
    await sealed_trail(app, clock, (2,))
    await app.ctx.seals.release()  # a restart with the rotated secret
    new_secret = "the-new-cookie-secret-0123"
    rotated = dataclasses.replace(settings, cookie_secret={1: settings.cookie_secret[1], 2: new_secret})
    second = make_app(rotated, rdb, clock)
    await add_events(second, clock, 2, tag="r")
    assert await second.ctx.seals.seal_once() == 2
    assert [seal.Seal.from_entry(i, f).key for i, f in await rdb.xrange(keys.SEALS)] == ["c1", "c2"]
    assert (await verify(second, clock)).ok  # each seal with the key version it names
    # Once version 1 is dropped, its seals cannot be checked, and verification says so.
    only_new = make_app(dataclasses.replace(settings, cookie_secret={2: new_secret}), rdb, clock)
    problem = only(await verify(only_new, clock))
    assert problem.kind == seal.NO_KEY and "c1" in problem.message
    # AUDIT_KEY: seals of its own, independent of cookie rotation; the older seals still verify by COOKIE_SECRET.
    await second.ctx.seals.release()
    own = make_app(dataclasses.replace(rotated, audit_key={1: "an-audit-key-of-its-own-0123"}), rdb, clock)
    await add_events(own, clock, 1, tag="a")
    assert await own.ctx.seals.seal_once() == 1
    assert [seal.Seal.from_entry(i, f).key for i, f in await rdb.xrange(keys.SEALS)][-1] == "a1"
    assert (await verify(own, clock)).ok
    for extra in (second, only_new, own):
        extra.ctx.close()


async def test_two_processes_one_seals_and_a_takeover_continues_the_chain(app, rdb, clock, redis_url) -> None:
    other_client = aioredis.Redis.from_url(redis_url)
    other = make_app(app.ctx.settings, other_client, clock)
    try:
        await add_events(app, clock, 3)
        first, second = app.ctx.seals, other.ctx.seals
        assert await first.seal_once() == 3 and first.holding
        assert await second.seal_once() == 0 and not second.holding
        await add_events(app, clock, 2, tag="x")
        # The holder stops renewing (a crash, a pause); the lease runs out in the site's clock.
        clock.advance(first.lease_ms / 1000 + 1)
        assert await second.seal_once() == 2 and second.holding
        found = [seal.Seal.from_entry(i, f) for i, f in await rdb.xrange(keys.SEALS)]
        assert [s.total for s in found] == [3, 5] and found[1].before == found[0].total
        # The old holder comes back: it cannot seal, and nothing forks.
        await add_events(app, clock, 1, tag="y")
        assert await first.seal_once() == 0 and not first.holding
        assert await second.seal_once() == 1
        report = await verify(app, clock)
        assert report.ok and report.seals == 3 and report.events == 6
        # A holder that stops gives the lease up: the other takes over at once.
        await second.release()
        assert await first.seal_once() == 0 and first.holding
    finally:
        other.ctx.close()
        await other_client.aclose()


async def test_sealing_races_cannot_fork_the_chain(app, rdb, clock, redis_url) -> None:
    """Two processes that both believe they hold the lease (a clock jump): the seal script refuses the second."""
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    apps = [make_app(app.ctx.settings, c, clock) for c in clients]
    try:
        await add_events(app, clock, 2)
        a, b = (x.ctx.seals for x in apps)
        assert await a.seal_once() == 2
        b.holding, b.token, b.head = True, a.token, seal.START  # b shares a's token and chains from the start
        await add_events(app, clock, 1, tag="z")
        # The script refuses a seal that does not chain from the newest one; b reads it and goes on from there.
        assert await b.seal_once() == 1
        assert [seal.Seal.from_entry(i, f).total for i, f in await rdb.xrange(keys.SEALS)] == [2, 3]
        assert (await verify(app, clock)).ok
    finally:
        for x, c in zip(apps, clients, strict=True):
            x.ctx.close()
            await c.aclose()


def test_the_outside_copy_is_shared_and_never_goes_back(tmp_path: Path) -> None:
    path = tmp_path / seal.OUTSIDE_NAME
    one, two = seal.OutsideCopy(path), seal.OutsideCopy(path)
    newer = seal.Seal("1700000000100-0", "c1", 20, b"\1" * 32, b"\2" * 8)
    older = seal.Seal("1700000000050-0", "c1", 10, b"\3" * 32, b"\4" * 8)
    assert one.write(newer)
    assert not two.write(older)  # another process on the same data dir is behind: it leaves the newer one
    recorded = one.read()
    assert recorded is not None and (recorded.id, recorded.total, recorded.mac) == (newer.id, 20, newer.mac)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".audit-seal.json.lock", "audit-seal.json"]
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a seal record"):
        one.read()
    assert one.write(newer)  # a new record, the unreadable one kept beside it for whoever looks into it
    assert [p.read_text() for p in tmp_path.glob("audit-seal.json.unreadable-*")] == ["not json"]


async def test_exports_with_seals_verify_offline_and_name_what_changed(app, rdb, clock, new_browser) -> None:
    admin = new_browser()
    await register_admin(admin, rdb, "root@example.com")
    assert await app.ctx.seals.seal_once() == 2  # its register and login
    await sealed_trail(app, clock)
    plain = await admin.get("/admin/audit.ndjson")
    sealed = await admin.get("/admin/audit.ndjson?seals=1")
    assert plain.code == sealed.code == 200
    lines = sealed.body.splitlines()
    assert b"seal" not in plain.body and json.loads(lines[0])[seal.EXPORT_HEADER] == 1
    rows = [json.loads(x) for x in lines[1:] if b'"seal"' not in x[:9]]
    assert b"\n".join(orjson.dumps(r) for r in rows) + b"\n" == plain.body  # the rows are the plain export's
    keys_ = app.ctx.seals.keys
    report = seal.verify_export(lines, keys_)
    assert report.ok, report.problems
    assert report.events == 12 and report.seals == 4 and report.verified is not None

    def tampered(edit: Any) -> seal.Problem:
        return only(seal.verify_export(edit([bytes(x) for x in lines]), keys_))

    event_lines = [n for n, x in enumerate(lines) if x.startswith(b'{"id"')]
    n = event_lines[4]
    victim = json.loads(lines[n])["id"]
    altered = lambda ls: [*ls[:n], ls[n].replace(b'"ip":"10.0.0', b'"ip":"10.9.9'), *ls[n + 1:]]  # noqa: E731
    assert (tampered(altered).kind, tampered(altered).event) == (seal.ALTERED, victim)
    deleted = tampered(lambda ls: ls[:n] + ls[n + 1:])
    assert deleted.kind == seal.DELETED
    swapped = tampered(lambda ls: [*ls[:n], ls[n + 1], ls[n], *ls[n + 2:]])
    assert swapped.kind == seal.REORDERED
    assert tampered(lambda ls: [ls[0], *ls[2:]]).kind in (seal.INSERTED, seal.SEALS_MISSING, seal.SEAL_ALTERED)
    assert only(seal.verify_export(plain.body.splitlines(), keys_)).kind == seal.SEALS_MISSING  # no seals in it
    # A filtered export: each event is checked against its seal.
    mine = await admin.get("/admin/audit.ndjson?seals=1&user=b1-2%40example.com")
    report = seal.verify_export(mine.body.splitlines(), keys_)
    assert report.ok and report.events == 1 and report.notes
    assert (await admin.get("/admin/audit.csv?seals=1")).code == 400
    assert (await admin.get("/admin/audit.ndjson?seals=yes")).code == 400


async def test_admin_pages_show_the_verification_and_a_warning_naming_the_first_bad_event(
        app, rdb, clock, new_browser, caplog) -> None:
    admin = new_browser()
    await register_admin(admin, rdb, "root@example.com")
    page = await admin.get("/admin/audit")
    assert b"does not verify the audit trail" in page.body  # honest: the verifier has not run here
    assert await app.ctx.seals.seal_once() == 2
    batches = await sealed_trail(app, clock)
    app.ctx.seals.status.running = True
    page = await admin.get("/admin")
    assert b"still checking the whole trail" in page.body
    await app.ctx.seals.full_pass()
    for path in ("/admin", "/admin/audit"):
        page = await admin.get(path)
        assert b"sealed and verified through 2023-11-14 22:13" in page.body, page.body
    victim = batches[1][2]
    await rewrite(rdb, lambda entries: [(i, {**f, b"r": b"forged"} if i == victim else f) for i, f in entries])
    with caplog.at_level(logging.ERROR, logger="sessionaudit.seal"):
        await app.ctx.seals.full_pass()
    assert any(victim in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    for path in ("/admin", "/admin/audit"):
        page = await admin.get(path)
        assert b'role="alert"' in page.body and f"event {victim} was altered".encode() in page.body
    metrics = app.ctx.metrics.registry.get_sample_value("sessionaudit_audit_verification_failed")
    assert metrics == 1
    # Put it right: the next pass clears the warning.
    await rewrite(rdb, lambda entries: [(i, {**f, b"r": b""} if i == victim else f) for i, f in entries])
    await app.ctx.seals.full_pass()
    assert b"sealed and verified through" in (await admin.get("/admin/audit")).body
    assert app.ctx.metrics.registry.get_sample_value("sessionaudit_audit_verification_failed") == 0


async def test_following_verifies_new_seals_of_another_process(app, rdb, clock, redis_url) -> None:
    other_client = aioredis.Redis.from_url(redis_url)
    sealer = make_app(app.ctx.settings, other_client, clock)
    try:
        watcher = app.ctx.seals
        await add_events(app, clock, 2)
        await sealer.ctx.seals.seal_once()
        await watcher.follow_once()
        assert watcher.status.verified_events == 2
        await add_events(app, clock, 3, tag="n")
        await sealer.ctx.seals.seal_once()
        newest = (await rdb.xrevrange(keys.SEALS, count=1))[0][0].decode()
        await watcher.follow_once()
        assert watcher.status.verified_id == newest and watcher.status.verified_events == 5
        # Events altered after sealing, before this process looked at their seal.
        await add_events(app, clock, 2, tag="m")
        await sealer.ctx.seals.seal_once()
        last = [e.id for e in await read_events(rdb)][-1]
        await rewrite(rdb, lambda entries: [(i, {**f, b"e": b"x@example.com"} if i == last else f)
                                            for i, f in entries])
        await watcher.follow_once()
        assert watcher.status.state == "failed" and watcher.status.problem.event == last
    finally:
        sealer.ctx.close()
        await other_client.aclose()


async def test_events_left_unsealed_are_reported(app, clock) -> None:
    service = app.ctx.seals
    await add_events(app, clock, 1)
    await service.follow_once()
    assert service.status.unsealed_since is None  # just appended: within the grace
    clock.advance(seal.UNSEALED_GRACE_MS / 1000 + 1)
    await service.follow_once()
    assert service.status.unsealed_since is not None
    await service.seal_once()
    await service.follow_once()
    assert service.status.unsealed_since is None


async def test_every_process_on_the_real_clock_seals_within_two_seconds(rdb, settings) -> None:
    import asyncio
    import time

    application = make_app(dataclasses.replace(settings), rdb)  # the real clock
    service = application.ctx.seals
    service.start()
    try:
        await asyncio.sleep(0.2)
        lags = []
        for k in range(3):
            await application.ctx.users.create(f"rt{k}@example.com", "x")
            appended = time.monotonic()
            newest = (await rdb.xrevrange(keys.AUDIT, count=1))[0][0]
            deadline = appended + 5
            while time.monotonic() < deadline:
                top = await rdb.xrevrange(keys.SEALS, count=1)
                if top and top[0][0] >= newest:
                    break
                await asyncio.sleep(0.02)
            lags.append(time.monotonic() - appended)
        assert max(lags) <= 2.0, lags
        # ...and the background passes keep coming, at most 5 s apart.
        deadline = time.monotonic() + 8
        while service.status.passes < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.status.passes >= 2 and service.status.state == "ok"
    finally:
        await service.stop()
        application.ctx.close()


async def test_verify_checks_each_new_process_restart(app, rdb, clock, browser: Browser) -> None:
    """Restarts: a new process continues the chain from the newest seal in Redis."""
    await sealed_trail(app, clock, (2,))
    await app.ctx.seals.release()
    again = make_app(app.ctx.settings, rdb, clock)
    async with serving(again):
        await add_events(again, clock, 2, tag="after-restart")
        assert await again.ctx.seals.seal_once() == 2
        found = [seal.Seal.from_entry(i, f) for i, f in await rdb.xrange(keys.SEALS)]
        assert [s.total for s in found] == [2, 4]
        assert (await verify(again, clock)).ok


def test_settings_without_any_secret_seal_nothing() -> None:
    assert not seal.SealKeys.from_settings(test_settings(cookie_secret={}))


FLOOD = """
for k = 1, tonumber(ARGV[1]) do
  emit(tonumber(ARGV[2]), {t = 'login_failed', e = 'x' .. k .. '@example.com', i = '10.0.0.1',
                           g = 'Agent/' .. (k % 3), r = 'bad_credentials'})
end
return 1
"""


async def test_a_flood_is_sealed_in_full_batches_and_checked_across_them(app, rdb, clock) -> None:
    await keys.Script(rdb, FLOOD)(args=[4500, int(clock() * 1000)])
    assert await app.ctx.seals.seal_once() == 4500
    found = [seal.Seal.from_entry(i, f) for i, f in await rdb.xrange(keys.SEALS)]
    assert [s.count for s in found] == [seal.BATCH_MAX, seal.BATCH_MAX, 500]
    assert (await verify(app, clock)).ok
    victim = (await rdb.xrange(keys.AUDIT, "-", "+", count=3001))[-1][0].decode()  # inside the second batch
    await rewrite(rdb, lambda entries: [(i, {**f, b"r": b"throttled"} if i == victim else f) for i, f in entries])
    problem = only(await verify(app, clock))
    assert (problem.kind, problem.event, problem.seal) == (seal.ALTERED, victim, found[1].id)


async def test_an_entry_that_is_no_event_is_sealed_too(app, rdb, clock) -> None:
    """Garbage written into the trail does not stop the sealer; changing it afterwards is still seen."""
    first = await add_events(app, clock, 1)
    ms, seq = first[0].split("-")
    junk = await rdb.xadd(keys.AUDIT, {"t": "login", "a": "not a number"}, id=f"{ms}-{int(seq) + 1}")
    await app.ctx.users.create("after@example.com", "x")
    assert await app.ctx.seals.seal_once() == 3
    assert (await verify(app, clock)).ok
    await rewrite(rdb, lambda entries: [(i, {b"t": b"login", b"a": b"still not"} if i == junk.decode() else f)
                                        for i, f in entries])
    assert only(await verify(app, clock)).event == junk.decode()


async def test_an_unwritable_data_dir_is_reported_not_fatal(app, clock, tmp_path, caplog) -> None:
    (tmp_path / "not-a-dir").write_text("")  # unwritable for root too
    app.ctx.seals.outside = seal.OutsideCopy(tmp_path / "not-a-dir" / seal.OUTSIDE_NAME)
    await add_events(app, clock, 1)
    await app.ctx.seals.seal_once()
    with caplog.at_level(logging.ERROR, logger="sessionaudit.seal"):
        await app.ctx.seals.follow_once()
        await add_events(app, clock, 1, tag="more")
        await app.ctx.seals.seal_once()
        await app.ctx.seals.follow_once()
    complaints = [r.getMessage() for r in caplog.records if "cannot write the copy" in r.getMessage()]
    assert len(complaints) == 1 and "not-a-dir" in complaints[0]  # once, not at every round
    assert app.ctx.seals.status.verified_events == 2  # sealing and checking go on


async def test_a_pass_is_not_fooled_by_sealing_or_retention_while_it_runs(app, rdb, clock) -> None:
    """A background pass is slow on purpose; the trail grows and is trimmed meanwhile."""
    await keys.Script(rdb, FLOOD)(args=[3 * seal.BATCH_MAX + 10, int(clock() * 1000)])
    assert await app.ctx.seals.seal_once() == 3 * seal.BATCH_MAX + 10
    clock.advance(10 * 86400)
    done = []

    async def meanwhile() -> None:  # at the pass's first pause: retention (ahead of the pass), new events
        if not done:
            done.append(True)
            trimmed = await app.ctx.audit.trim_step(int((clock() - 86400) * 1000), batch=2 * seal.BATCH_MAX + 1)
            assert trimmed == 3 * seal.BATCH_MAX
            await add_events(app, clock, 3, tag="meanwhile")
            assert await app.ctx.seals.seal_once() == 3

    report = await seal.verify_redis(rdb, app.ctx.seals.keys, now_ms=int(clock() * 1000), retention_days=1,
                                     pace=meanwhile)
    assert done and report.ok, report.problems
    assert (await verify(app, clock, retention_days=1)).ok


async def test_sealing_waits_quietly_while_redis_is_down_and_goes_on(settings, tmp_path, caplog) -> None:
    import asyncio
    import time

    from sessionaudit.cli import redis_client
    from sessionaudit.redis_server import RedisServer
    server = RedisServer.ephemeral(tmp_path).start()
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    client = redis_client(server.url)
    application = make_app(settings, client)  # the real clock: the service runs on its own
    service = application.ctx.seals
    service.interval = 0.05
    try:
        service.start()
        await application.ctx.users.create("before@example.com", "x")
        deadline = time.monotonic() + 10
        while service.status.verified_events < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert service.status.verified_events == 1
        with caplog.at_level(logging.WARNING, logger="sessionaudit.seal"):
            server.stop()
            await asyncio.sleep(1.0)  # some twenty rounds fail meanwhile
            server = RedisServer.ephemeral(tmp_path, port=port).start()  # an empty Redis: a new trail
            await application.ctx.users.create("after@example.com", "x")
            deadline = time.monotonic() + 10
            while not await client.exists(keys.SEALS) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        assert await client.exists(keys.SEALS)  # sealing went on by itself
        unreachable = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert 1 <= len(unreachable) <= 3  # one line per loop, not one per round
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "Traceback" in r.getMessage()]
    finally:
        await service.stop()
        application.ctx.close()
        await client.aclose()
        server.stop()
