"""Prometheus metrics of one process. Cheap on the hot path: in-memory counters, no Redis."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The methods a request can be counted under; any other name is counted as "other", so made-up
# methods cannot grow the metrics (each label value is a series kept for the process's life).
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def method_label(method: str | None) -> str:
    """The request method as a metric label and in the access log: a known method, or ``other``."""
    return method if method in METHODS else "other"


class Metrics:
    """Every metric of the site, in a registry of its own (one per app: tests build many)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sessionaudit_http_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("sessionaudit_http_request_duration_seconds", "Request latency by route",
                                 ["route"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.logins = Counter("sessionaudit_logins", "Login attempts by result (ok, failed, throttled)",
                              ["result"], registry=r)
        self.live_sessions = Gauge("sessionaudit_live_sessions", "Live sessions (from the deadline index)",
                                   registry=r)
        self.events = Counter("sessionaudit_audit_events", "Audit events appended by this process, by type",
                              ["type"], registry=r)
        self.sweeper_lag = Gauge("sessionaudit_sweeper_lag_seconds",
                                 "Now minus the oldest deadline still due at the last sweep", registry=r)
        self.expired = Counter("sessionaudit_sweeper_expired", "Sessions recorded as expired by the sweeper",
                               registry=r)
        self.sweeps = Counter("sessionaudit_sweeper_runs", "Sweeper runs", registry=r)
        self.redis_errors = Counter("sessionaudit_redis_errors", "Requests that failed because Redis was down",
                                    registry=r)
        self.redis_reconnects = Counter("sessionaudit_redis_reconnects",
                                        "Times background work found Redis reachable again after an outage",
                                        registry=r)
        self.hash_queue = Gauge("sessionaudit_argon2_queue", "Password hashes waiting or running", registry=r)
        self.hash_seconds = Histogram("sessionaudit_argon2_seconds", "Time of one argon2 hash or verify",
                                      registry=r, buckets=(.01, .025, .05, .1, .2, .4, .8, 1.6))
        self.followers = Gauge("sessionaudit_live_followers", "Admins following the audit trail", registry=r)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.mail = Counter("sessionaudit_mail", "Mail by result: sent (to the SMTP server), written (to the outbox, "
                            "no SMTP server), retry (a temporary failure), kept (not deliverable: left in the outbox), "
                            "dropped (queue full)", ["result"], registry=r)
        for result in ("sent", "written", "retry", "kept", "dropped"):
            self.mail.labels(result)  # every series from the start, so a rate() sees the first failure
        self.mail_queue = Gauge("sessionaudit_mail_queue", "Mail waiting to be delivered (queued or between tries)",
                                registry=r)
        self.seal_failed = Gauge("sessionaudit_audit_verification_failed",
                                 "1 when this process found the audit trail not what was sealed (see its ERROR log "
                                 "line and the admin pages), else 0", registry=r)
        self.verified_through = Gauge("sessionaudit_audit_verified_through_seconds",
                                      "Unix time of the newest event this process has verified against its seal",
                                      registry=r)
        self.unsealed_age = Gauge("sessionaudit_audit_unsealed_seconds",
                                  "Age of the oldest audit event not sealed yet (0: all sealed)", registry=r)
        self.sealed_events = Counter("sessionaudit_audit_sealed_events", "Audit events sealed by this process",
                                     registry=r)
        self.seals = Counter("sessionaudit_audit_seals", "Seals written by this process", registry=r)
        self.verify_seconds = Gauge("sessionaudit_audit_verify_pass_seconds",
                                    "Duration of the last whole-trail verification pass", registry=r)
        self.verify_cpu = Gauge("sessionaudit_audit_verify_pass_cpu_seconds",
                                "CPU time of the IOLoop thread during the last whole-trail verification pass (the "
                                "pass's own when the process served nothing else meanwhile)", registry=r)
        self.verify_events = Gauge("sessionaudit_audit_verify_pass_events",
                                   "Events checked by the last whole-trail verification pass", registry=r)
        self.verify_passes = Counter("sessionaudit_audit_verify_passes", "Whole-trail verification passes finished",
                                     registry=r)

    def login(self, result: str) -> None:
        self.logins.labels(result).inc()

    def mail_result(self, result: str) -> None:
        self.mail.labels(result).inc()

    def event(self, kind: str, n: int = 1) -> None:
        self.events.labels(kind).inc(n)

    def sweep(self, expired: int, lag_ms: int) -> None:
        self.sweeps.inc()
        if expired:
            self.expired.inc(expired)
            self.event("expired", expired)
        self.sweeper_lag.set(lag_ms / 1000)

    def sealed(self, events: int) -> None:
        self.seals.inc()
        self.sealed_events.inc(events)

    def unsealed(self, seconds: float) -> None:
        self.unsealed_age.set(max(0.0, seconds))

    def verify_pass(self, seconds: float, cpu: float, events: int) -> None:
        self.verify_passes.inc()
        self.verify_seconds.set(seconds)
        self.verify_cpu.set(cpu)
        self.verify_events.set(events)

    def seal_status(self, failed: bool, verified_through: float | None) -> None:
        self.seal_failed.set(1 if failed else 0)
        if verified_through is not None:
            self.verified_through.set(verified_through)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request. Each series' child is looked up once (routes, methods and statuses are few)."""
        key = (route, method_label(method), status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(key[0], key[1], str(status)),
                                              self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)
