"""The webhook dispatcher: an outbox derived from the event log, away from the recording path.

Every worker may run `run_forever()`. Each pass:

1. scan: reads the events recorded since the shared cursor (a window of ids behind it too,
   because on PostgreSQL a transaction can commit an older id after a newer one) and turns
   session starts, exits, losses and the attention rule's verdicts into delivery rows, one per
   (hook, session, kind, occurrence). The unique constraint makes scanning idempotent: two
   workers scanning the same events create each row once.
2. claim: takes due deliveries with a conditional UPDATE on their claim (compare and set), so
   exactly one worker holds each while it POSTs.
3. send: POSTs the signed JSON with httpx (timeouts well inside the claim), records the
   response code, and either marks it delivered, schedules a retry (exponential backoff), or
   gives up after PORTHOLE_WEBHOOK_MAX_ATTEMPTS and logs it.

Recording never waits for any of this: the dispatcher only reads events, in its own task and
on its own database thread and connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import Max, Q
from django.utils import timezone

from dashboard.agents.models import AgentSession, Event
from dashboard.awareness import attention, webhooks
from dashboard.awareness.models import Cursor, Delivery, Hook, Kind

log = logging.getLogger(__name__)

CURSOR = "events"
RESCAN_IDS = 2000
SCAN_LIMIT = 5000
CLAIM_SECONDS = 60
CLAIM_BATCH = 20
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Sessions idle for longer than this are no longer re-examined for the idle verdict.
IDLE_HORIZON = timedelta(days=7)
KEEP_DAYS = 30
PRUNE_EVERY = timedelta(hours=1)
RELEVANT = (
    Q(seq=1)
    | Q(source=Event.Source.BRIDGE, type__in=["exit", "lost", "gap"])
    | Q(source=Event.Source.AGENT, type__in=["result", "error"])
)
ATTENTION_NOW = Q(attention_error=True) | Q(attention_gap=True) | Q(attention_idle=True)


def max_attempts() -> int:
    return int(settings.PORTHOLE_WEBHOOK_MAX_ATTEMPTS)


def backoff(attempts: int) -> timedelta:
    """After the n-th failed attempt: base × 2^(n-1), capped at an hour."""
    base = float(settings.PORTHOLE_WEBHOOK_BACKOFF_SECONDS)
    return timedelta(seconds=min(base * 2 ** max(attempts - 1, 0), 3600.0))


def worker_name() -> str:
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Occurrence:
    kind: str
    session: AgentSession
    occurrence: int
    at: datetime
    reasons: list[str]


# -- 1. scan ------------------------------------------------------------------------------------


def _cursor() -> Cursor:
    """The shared cursor; a new deployment starts at the present, not with its whole history."""
    cursor = Cursor.objects.filter(name=CURSOR).first()
    if cursor is not None:
        return cursor
    start = Event.objects.aggregate(top=Max("id"))["top"] or 0
    try:
        with transaction.atomic():
            return Cursor.objects.create(name=CURSOR, position=start)
    except IntegrityError:
        return Cursor.objects.get(name=CURSOR)


def _occurrences(now: datetime, after_id: int) -> tuple[list[Occurrence], int]:
    events = list(
        Event.objects.filter(id__gt=max(after_id - RESCAN_IDS, 0))
        .filter(RELEVANT)
        .select_related("session", "session__started_by", "session__sandbox")
        .order_by("id")[:SCAN_LIMIT]
    )
    found: list[Occurrence] = []
    candidates: set[Any] = set()
    for event in events:
        session = event.session
        if event.seq == 1:
            found.append(Occurrence(Kind.STARTED, session, 1, event.created_at, []))
        if event.source == Event.Source.BRIDGE and event.type == "exit":
            code = (event.data or {}).get("code")
            clean = code == 0 or session.kill_requested
            kind = Kind.FINISHED if clean else Kind.FAILED
            reasons = [] if clean else [attention.REASONS["failed"]]
            found.append(Occurrence(kind, session, event.seq, event.created_at, reasons))
        elif event.source == Event.Source.BRIDGE and event.type == "lost":
            reason = [attention.REASONS["lost"]]
            found.append(Occurrence(Kind.LOST, session, event.seq, event.created_at, reason))
        elif event.type in ("result", "error", "gap"):
            candidates.add(session.pk)
    # The rule decides, for the sessions those events touched and for idle ones (time passing
    # is no event). One delivery per turn: the occurrence is the seq of the last follow-up.
    flagged = attention.with_attention(
        AgentSession.objects.filter(
            Q(pk__in=candidates)
            | Q(status=AgentSession.Status.IDLE, last_event_at__gte=now - IDLE_HORIZON)
        ),
        now=now,
    ).filter(ATTENTION_NOW)
    for session in flagged.select_related("started_by", "sandbox"):
        verdict = attention.of(session)
        live = [r for r in verdict.reasons if r in ("error", "gap", "idle")]
        at = session.last_event_at or now
        found.append(
            Occurrence(
                Kind.NEEDS_ATTENTION,
                session,
                verdict.turn,
                at,
                [attention.REASONS[r] for r in live],
            )
        )
    top = max((event.id for event in events), default=after_id)
    return found, top


def scan(now: datetime | None = None) -> int:
    """Turn new events into deliveries for the hooks that want them (the number offered; rows
    that exist already are left as they are)."""
    now = now or timezone.now()
    cursor = _cursor()
    hooks = list(Hook.objects.filter(active=True))
    if not hooks:  # nobody to tell: keep up with the log and do nothing else
        top = Event.objects.aggregate(top=Max("id"))["top"] or 0
        found: list[Occurrence] = []
    else:
        found, top = _occurrences(now, cursor.position)
    rows = []
    for item in found:
        body = webhooks.payload(
            item.kind, item.session, occurrence=item.occurrence, reasons=item.reasons
        )
        for hook in hooks:
            # A hook hears of what happened after it was added, not of the whole history.
            if hook.wants(item.kind) and hook.created_at <= item.at:
                rows.append(
                    Delivery(
                        hook=hook,
                        session=item.session,
                        kind=item.kind,
                        occurrence=item.occurrence,
                        payload=body,
                        next_attempt_at=now,
                    )
                )
    if rows:
        # Most of a rescan is known already: skip those rows rather than have the database
        # refuse them (on SQLite even a refused insert takes the write lock from recording).
        known = set(
            Delivery.objects.filter(session_id__in={row.session_id for row in rows}).values_list(
                "hook_id", "session_id", "kind", "occurrence"
            )
        )
        rows = [
            row
            for row in rows
            if (row.hook_id, row.session_id, row.kind, row.occurrence) not in known
        ]
    if rows:
        Delivery.objects.bulk_create(rows, ignore_conflicts=True)
    if top > cursor.position:
        Cursor.objects.filter(name=CURSOR, position__lt=top).update(position=top, updated_at=now)
    return len(rows)


# -- 2. claim -----------------------------------------------------------------------------------


def claim_due(worker: str, *, limit: int = CLAIM_BATCH) -> list[Delivery]:
    now = timezone.now()
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    due = list(
        Delivery.objects.filter(free, status=Delivery.Status.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("pk", "claimed_until")[:limit]
    )
    won = []
    for pk, until in due:
        unclaimed = Q(claimed_until__isnull=True) if until is None else Q(claimed_until=until)
        taken = Delivery.objects.filter(unclaimed, pk=pk, status=Delivery.Status.PENDING).update(
            claimed_by=worker, claimed_until=now + timedelta(seconds=CLAIM_SECONDS)
        )
        if taken:
            won.append(pk)
    return list(Delivery.objects.filter(pk__in=won, claimed_by=worker).select_related("hook"))


# -- 3. send ------------------------------------------------------------------------------------


def settle(delivery: Delivery, worker: str, status_code: int | None, error: str) -> str:
    """Record one attempt; the delivery's new status."""
    now = timezone.now()
    attempts = delivery.attempts + 1
    fields: dict[str, Any] = {
        "attempts": attempts,
        "last_status_code": status_code,
        "last_error": error[:300],
        "claimed_by": "",
        "claimed_until": None,
    }
    if status_code is not None and 200 <= status_code < 300:
        fields.update(status=Delivery.Status.DELIVERED, delivered_at=now, finished_at=now)
    elif attempts >= max_attempts():
        fields.update(status=Delivery.Status.FAILED, finished_at=now)
        log.warning(
            "webhook %s: gave up on delivery %s (%s, session %s) after %d attempts: %s",
            delivery.hook_id,
            delivery.pk,
            delivery.kind,
            delivery.session_id,
            attempts,
            error or f"HTTP {status_code}",
        )
    else:
        fields.update(next_attempt_at=now + backoff(attempts))
    Delivery.objects.filter(pk=delivery.pk, claimed_by=worker).update(**fields)
    return str(fields.get("status", Delivery.Status.PENDING))


async def send(client: httpx.AsyncClient, delivery: Delivery, worker: str) -> str:
    body = webhooks.body_of(delivery.payload, str(delivery.pk))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Porthole-Webhooks/1",
        webhooks.EVENT_HEADER: delivery.kind,
        webhooks.DELIVERY_HEADER: str(delivery.pk),
        webhooks.SIGNATURE_HEADER: webhooks.sign(delivery.hook.secret, body),
    }
    status_code: int | None = None
    error = ""
    try:
        response = await client.post(delivery.hook.url, content=body, headers=headers)
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    return await sync_to_async(settle)(delivery, worker, status_code, error)


def prune(now: datetime | None = None) -> int:
    """Forget settled deliveries after KEEP_DAYS (the log shows the latest anyway)."""
    cutoff = (now or timezone.now()) - timedelta(days=KEEP_DAYS)
    old = Delivery.objects.filter(created_at__lt=cutoff).exclude(status=Delivery.Status.PENDING)
    return int(old.delete()[0])


async def run_once(client: httpx.AsyncClient, worker: str) -> int:
    await sync_to_async(scan)()
    due = await sync_to_async(claim_due)(worker)
    if due:
        await asyncio.gather(*(send(client, delivery, worker) for delivery in due))
    return len(due)


def _close_connection() -> None:
    close_old_connections()
    connection.close()


async def run_forever(
    *, stop: asyncio.Event | None = None, interval: float = 2.0, worker: str | None = None
) -> None:
    """The dispatcher loop, for `manage.py serve` or any worker: runs until `stop` is set or it
    is cancelled. Several may run at once, in one process or many."""
    stop = stop or asyncio.Event()
    worker = worker or worker_name()
    # A database thread (and connection) of its own: never queued behind consumers or bridges.
    async with ThreadSensitiveContext():
        try:
            await sync_to_async(webhooks.ensure_env_hooks)()
        except Exception:
            log.exception("webhooks: could not add the hooks of PORTHOLE_WEBHOOK_URLS")
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False) as client:
                pruned_at: datetime | None = None
                while not stop.is_set():
                    busy = 0
                    try:
                        if pruned_at is None or timezone.now() - pruned_at > PRUNE_EVERY:
                            pruned_at = timezone.now()
                            await sync_to_async(prune)()
                        busy = await run_once(client, worker)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("webhooks: dispatcher pass failed")
                    if busy:
                        continue  # more may be due right away
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)
        finally:
            with contextlib.suppress(Exception):
                await sync_to_async(_close_connection)()
