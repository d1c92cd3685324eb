"""Operations endpoints: `/healthz` (alive), `/readyz` (able to serve), `/metrics` (Prometheus).

`/readyz` answers 503 naming every check that failed, so a load balancer stops sending
people to a worker that cannot reach its database, its channel layer or the OpenComputer
API. `/metrics` is for the monitoring system only: from PORTHOLE_METRICS_ALLOW addresses
(loopback by default), or with `Authorization: Bearer $PORTHOLE_METRICS_TOKEN`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from wsgiref.simple_server import WSGIServer

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection, connections
from django.db.models import Count, F, Min, Q, Sum
from django.db.models.functions import Now
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dashboard import metrics as _counters  # noqa: F401 - registers the counters everyone uses
from dashboard.agents.management import unapplied_migrations
from dashboard.proxies import is_in, parse_networks

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 3.0
WORKER_STALE_SECONDS = 15
WATCHER_TTL_SECONDS = 90


# -- /healthz and /readyz ------------------------------------------------------------------------


@never_cache
@require_GET
async def healthz(request: HttpRequest) -> HttpResponse:
    """For container health checks: the process answers and the database does, within
    CHECK_TIMEOUT (503 otherwise)."""
    _, result = await _run("database", _check_database_answers)
    if result != "ok":
        return HttpResponse(f"database: {result}\n", status=503, content_type="text/plain")
    return HttpResponse("ok", content_type="text/plain")


class UnappliedMigrations(Exception):
    """The database lacks migrations this code has: every page would fail."""


# The database checks run on threads of their own, not a request's: a database that does
# not answer holds a call for as long as the pool waits for a connection (30 s), and an
# answer must come within CHECK_TIMEOUT. A check left hanging ends on its own; two of them
# at most, and later checks wait their turn (and time out) rather than pile up threads.
_DATABASE_CHECKS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="porthole-db-check")
_migrated = threading.Event()  # once found so, not looked at again


def _database(migrations: bool) -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        if migrations and not _migrated.is_set():
            pending = unapplied_migrations()
            if pending:
                raise UnappliedMigrations(f"{len(pending)} unapplied, first {pending[0]}")
            _migrated.set()
    finally:
        connections.close_all()  # this thread's, which nothing else would close


async def _check_database() -> None:
    await asyncio.get_running_loop().run_in_executor(_DATABASE_CHECKS, _database, True)


async def _check_database_answers() -> None:
    await asyncio.get_running_loop().run_in_executor(_DATABASE_CHECKS, _database, False)


async def _check_layer() -> None:
    """A message there and back through the channel layer (Redis in a team deployment)."""
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    channel = await layer.new_channel()
    token = uuid.uuid4().hex
    await layer.send(channel, {"type": "readyz.ping", "token": token})
    message = await layer.receive(channel)
    if message.get("token") != token:
        raise RuntimeError("the channel layer returned someone else's message")


async def _check_live_layer() -> None:
    """A message there and back through the live streams' layer (Redis pub/sub in a team
    deployment), through this worker's own subscription: publishing alone succeeds on a
    worker whose subscriber connection is gone, whose viewers get nothing live."""
    from dashboard.agents.recording import live_layer

    layer = live_layer()
    group = f"porthole.readyz.{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    channel = await layer.new_channel()
    try:
        await layer.group_add(group, channel)
        await layer.group_send(group, {"type": "readyz.ping", "token": token})
        message = await layer.receive(channel)
    finally:
        await layer.group_discard(group, channel)
        await _forget(layer, channel)
    if message.get("token") != token:
        raise RuntimeError("the live layer returned someone else's message")


async def _forget(layer: Any, channel: str) -> None:
    """Leave nothing subscribed: a pub/sub layer unsubscribes a channel when a receive on it
    is cancelled (as when a consumer goes); an in-memory channel expires by itself."""
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)  # let it reach the subscription
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def _check_upstream() -> None:
    from dashboard.agents import upstream

    await upstream.client().list_sandboxes()


CHECKS: dict[str, Callable[[], Awaitable[None]]] = {
    "database": _check_database,
    "channel_layer": _check_layer,
    "live_layer": _check_live_layer,
    "upstream": _check_upstream,
}


async def _run(name: str, check: Callable[[], Awaitable[None]]) -> tuple[str, str]:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except TimeoutError:
        return name, f"timed out after {CHECK_TIMEOUT:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
        log.warning("readiness check %s failed: %s", name, exc)
        # Only the exception's kind: messages can hold hosts or URLs an outsider should not see.
        return name, type(exc).__name__
    return name, "ok"


@never_cache
@require_GET
async def readyz(request: HttpRequest) -> JsonResponse:
    """200 when the database, both channel layers and the OpenComputer API all answer."""
    results = dict(await asyncio.gather(*(_run(name, check) for name, check in CHECKS.items())))
    ready = all(result == "ok" for result in results.values())
    failed = sorted(name for name, result in results.items() if result != "ok")
    body = {"status": "ready" if ready else "unavailable", "checks": results, "failed": failed}
    return JsonResponse(body, status=200 if ready else 503)


# -- /metrics -----------------------------------------------------------------------------------


class DatabaseCollector(Collector):
    """What the database knows, read when scraped: the same on every worker."""

    def collect(self) -> Iterator[Metric]:
        from dashboard.agents.models import AgentSession, BridgeWorker, Watcher

        statuses = GaugeMetricFamily(
            "porthole_sessions", "Agent sessions by status", labels=["status"]
        )
        counts = dict(AgentSession.objects.values_list("status").annotate(n=Count("id")).order_by())
        for status in AgentSession.Status.values:
            statuses.add_metric([status], counts.get(status, 0))
        yield statuses

        live = AgentSession.objects.filter(status__in=AgentSession.LIVE_STATUSES)
        held = live.filter(bridge_lease_until__gt=Now())
        leases = GaugeMetricFamily(
            "porthole_bridge_leases",
            "Live sessions' bridge leases held now, by worker",
            labels=["worker"],
        )
        for owner, n in held.values_list("bridge_owner").annotate(n=Count("id")).order_by():
            leases.add_metric([owner], n)
        yield leases
        yield GaugeMetricFamily(
            "porthole_sessions_unbridged",
            "Live sessions whose bridge lease is not held now (nothing records them)",
            value=live.exclude(bridge_lease_until__gt=Now()).count(),
        )
        yield GaugeMetricFamily(
            "porthole_bridge_workers",
            f"Bridge workers seen in the last {WORKER_STALE_SECONDS} s",
            value=BridgeWorker.objects.filter(
                seen_at__gt=Now() - timedelta(seconds=WORKER_STALE_SECONDS)
            ).count(),
        )

        viewers = GaugeMetricFamily(
            "porthole_viewers", "Open session sockets, by kind", labels=["kind"]
        )
        fresh = Watcher.objects.filter(
            seen_at__gt=timezone.now() - timedelta(seconds=WATCHER_TTL_SECONDS)
        ).aggregate(
            members=Count("channel_name", filter=Q(share_link__isnull=True)),
            links=Count("channel_name", filter=Q(share_link__isnull=False)),
        )
        viewers.add_metric(["member"], fresh["members"] or 0)
        viewers.add_metric(["link"], fresh["links"] or 0)
        yield viewers

        # next_seq - 1 per session: every stored event, without counting the events table.
        stored = AgentSession.objects.aggregate(n=Sum(F("next_seq") - 1))["n"] or 0
        yield GaugeMetricFamily("porthole_events_stored", "Events stored, all sessions", stored)
        behind = AgentSession.objects.filter(undrawn_from__isnull=False).aggregate(
            n=Sum(F("next_seq") - F("undrawn_from"))
        )["n"]
        yield GaugeMetricFamily(
            "porthole_events_undrawn",
            "Events stored and not yet drawn for viewers (bridges that fell behind a flood)",
            behind or 0,
        )
        oldest = live.filter(status=AgentSession.Status.WORKING).aggregate(
            oldest=Min("last_event_at")
        )["oldest"]
        silence = (timezone.now() - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "porthole_working_silence_seconds",
            "Longest time since the last recorded event among working sessions",
            value=max(silence, 0.0),
        )


_database_registry = CollectorRegistry(auto_describe=False)
_database_registry.register(DatabaseCollector())


def _may_scrape(request: HttpRequest) -> bool:
    token = getattr(settings, "PORTHOLE_METRICS_TOKEN", "")
    header = str(request.headers.get("Authorization", ""))
    if token and header.startswith("Bearer "):
        return secrets.compare_digest(header.removeprefix("Bearer ").strip(), token)
    if request.META.get("PORTHOLE_UNTRUSTED_FORWARDED"):
        # Forwarded by a proxy we were not told to trust: its peer address says nothing.
        return False
    allowed = parse_networks(
        getattr(settings, "PORTHOLE_METRICS_ALLOW", []), "PORTHOLE_METRICS_ALLOW"
    )
    return is_in(str(request.META.get("REMOTE_ADDR", "")), allowed)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """This process's counters, and what the database knows, in Prometheus' text format."""
    if not _may_scrape(request):
        # Django logs the 403 without the peer: say who, for PORTHOLE_METRICS_ALLOW.
        log.warning("metrics refused to %s", request.META.get("REMOTE_ADDR", "?"))
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    started = time.monotonic()
    body = generate_latest(REGISTRY) + generate_latest(_database_registry)
    log.debug("metrics rendered in %.3f s", time.monotonic() - started)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


class ClosingItsConnection(Collector):
    """`DatabaseCollector` for the metrics server of a process without HTTP. That server
    answers each scrape on a new thread, whose database connection nothing else closes:
    with PostgreSQL's pool each scrape kept a slot, until the bridges worker had none left
    to claim or record sessions with."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self.collector.collect()
        finally:
            connections.close_all()  # this thread's


def start_metrics_server(
    port: int | None = None, registry: CollectorRegistry = REGISTRY
) -> WSGIServer | None:
    """For processes without HTTP (`manage.py bridges`): serve this process's counters and
    the database's gauges on loopback at PORTHOLE_METRICS_PORT. None when not configured."""
    port = port if port is not None else int(getattr(settings, "PORTHOLE_METRICS_PORT", 0) or 0)
    if not port:
        return None
    if registry not in _with_database:
        registry.register(ClosingItsConnection(DatabaseCollector()))
        _with_database.append(registry)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server


_with_database: list[CollectorRegistry] = []
