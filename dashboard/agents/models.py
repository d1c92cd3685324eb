"""Sandboxes, agent sessions and their recorded events.

An `Event` is stored once, in order: `(session, seq)` is unique and `seq` is gap-free per
session. The unique pair guards order only; the fence between bridges is the lease epoch
on the session row, checked inside every write (leases.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

log = logging.getLogger(__name__)
_unbridged_logged: dict[object, float] = {}

MARKDOWN_LEAD = re.compile(r"^(?:#{1,6}\s+|>\s*|[-*+]\s+|\d+[.)]\s+)+")
MARKDOWN_EMPHASIS = re.compile(r"(\*\*|\*|`)(.+?)\1")  # not _: snake_case is common


# What code passes around for a session: its primary key, or that key as text.
SessionId = uuid.UUID | str


class Sandbox(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        STOPPED = "stopped", "Stopped"
        KILLED = "killed", "Killed"
        GONE = "gone", "Gone"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    upstream_id = models.CharField(max_length=128, unique=True)
    template = models.CharField(max_length=128, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    metadata = models.JSONField(default=dict, blank=True)
    idle_timeout = models.PositiveIntegerField(default=0, help_text="Seconds; 0 = persistent")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("kill_any_sandbox", "Can kill any sandbox, not only their own")]

    def __str__(self) -> str:
        return self.upstream_id

    @property
    def is_alive(self) -> bool:
        return self.status == self.Status.RUNNING

    @property
    def agent_kind(self) -> str:
        return str(self.metadata.get("agent", "")) if isinstance(self.metadata, dict) else ""


class AgentSession(models.Model):
    class Status(models.TextChoices):
        STARTING = "starting", "Starting"
        WORKING = "working", "Working"
        IDLE = "idle", "Idle"
        EXITED = "exited", "Exited"
        KILLED = "killed", "Killed"
        LOST = "lost", "Lost"

    LIVE_STATUSES = (Status.STARTING, Status.WORKING, Status.IDLE)
    FINISHED_STATUSES = (Status.EXITED, Status.KILLED, Status.LOST)

    class Origin(models.TextChoices):
        PORTHOLE = "porthole", "Started here"
        ATTACHED = "attached", "Attached"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="sessions")
    upstream_id = models.CharField(max_length=128)
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.PORTHOLE)
    title = models.CharField(max_length=200, blank=True)
    prompt = models.TextField(blank=True, help_text="The first prompt")
    config = models.JSONField(default=dict, blank=True)
    model = models.CharField(max_length=128, blank=True)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="agent_sessions",
    )
    resumed_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="continuations"
    )
    claude_session_id = models.CharField(max_length=128, blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.STARTING, db_index=True
    )
    exit_code = models.IntegerField(null=True, blank=True)
    total_cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    num_turns = models.PositiveIntegerField(default=0)
    duration_ms = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    # The next seq to assign; only the bridge holding the lease advances it.
    next_seq = models.PositiveBigIntegerField(default=1)
    # The first stored event whose fragment is not yet drawn and announced, while a bridge
    # that fell behind stores first and draws after (bridge.Undrawn); null when every
    # stored event has been. What a viewer can expect to have come is everything before it.
    undrawn_from = models.PositiveBigIntegerField(null=True, blank=True)
    # The bridge lease (leases.py): which worker holds the upstream socket, until when (by
    # the database's clock), and the epoch every claim advances: the fence. A bridge's
    # writes and upstream sends carry its epoch and are refused once it moved on.
    bridge_owner = models.CharField(max_length=64, blank=True)
    bridge_lease_until = models.DateTimeField(null=True, blank=True)
    bridge_epoch = models.PositiveBigIntegerField(default=0)
    kill_requested = models.BooleanField(default=False)

    class Meta:
        ordering = ["-started_at"]
        permissions = [
            ("steer_agentsession", "Can start, steer, interrupt, configure, kill and attach"),
            ("share_agentsession", "Can create share links"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["sandbox", "upstream_id"], name="unique_upstream_session"
            ),
        ]

    def __str__(self) -> str:
        return self.title or self.upstream_id

    def get_absolute_url(self) -> str:
        return reverse("session", args=[self.id])

    @property
    def is_live(self) -> bool:
        return self.status in self.LIVE_STATUSES

    @property
    def is_working(self) -> bool:
        return self.status == self.Status.WORKING

    @property
    def undrawn(self) -> int:
        """Events stored and not yet drawn for viewers (a bridge behind a flood)."""
        return self.next_seq - self.undrawn_from if self.undrawn_from is not None else 0

    UNBRIDGED_AFTER = 8  # seconds live with no lease before the page warns (leases.py)

    @property
    def unbridged(self) -> bool:
        """Live, and no worker has held its lease for a while: nothing records it (no
        `manage.py bridges` or `serve` running, or all of them stuck). Logged, rate-limited."""
        if not self.is_live:
            return False
        since = self.bridge_lease_until or self.started_at
        waited = (timezone.now() - since).total_seconds()
        if waited <= self.UNBRIDGED_AFTER:
            return False
        last = _unbridged_logged.get(self.pk, 0.0)
        if time.monotonic() - last > 60:
            _unbridged_logged[self.pk] = time.monotonic()
            log.warning(
                "session %s has been live for %d s with no bridge recording it: is "
                "`manage.py bridges` (or `manage.py serve`) running against this database?",
                self.pk,
                waited,
            )
        return True

    @staticmethod
    def title_from_prompt(prompt: str) -> str:
        """The first line, without the markdown that would show as symbols in a title."""
        first_line = next((line.strip() for line in prompt.splitlines() if line.strip()), "")
        plain = MARKDOWN_LEAD.sub("", first_line)
        plain = MARKDOWN_EMPHASIS.sub(r"\2", plain).strip()
        return (plain or first_line)[:200] or "(no prompt)"


class Event(models.Model):
    class Source(models.TextChoices):
        AGENT = "agent", "Agent"  # a stdout line of the wrapper
        STDERR = "stderr", "stderr"  # the wrapper's own log
        DASHBOARD = "dashboard", "Dashboard"  # an action someone took here, attributed
        BRIDGE = "bridge", "Bridge"  # what the bridge observed: gaps, exit, loss

    session = models.ForeignKey(AgentSession, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveBigIntegerField()
    source = models.CharField(max_length=16, choices=Source.choices)
    type = models.CharField(max_length=64, blank=True)
    subtype = models.CharField(max_length=64, blank=True)
    # The line exactly as received (JSON or not); for our own events, the JSON we wrote.
    raw = models.TextField()
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now)
    # The event's own element as the recorder rendered it, kept when a page would draw it
    # exactly the same way (no tool call or result to pair, no fold, no subagent, nobody
    # named): page loads and catch-ups use it instead of rendering the event again. Empty
    # for the rest, and for events recorded before it existed.
    html = models.TextField(null=True, blank=True)

    class Meta:
        ordering = ["session", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["session", "seq"], name="unique_event_seq"),
        ]
        indexes = [
            models.Index(fields=["session", "source", "seq"]),
            # What needs attention looks for the last event of a kind (attention.py).
            models.Index(fields=["session", "source", "type", "seq"]),
        ]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.seq} {self.type}"

    @property
    def data(self) -> dict[str, Any] | None:
        """The parsed line when it is a JSON object, else None (cached per instance)."""
        if not hasattr(self, "_data"):
            try:
                parsed = json.loads(self.raw)
            except (ValueError, RecursionError):
                parsed = None
            self._data = parsed if isinstance(parsed, dict) else None
        return self._data


class ShareLink(models.Model):
    """A read-only, possibly expiring link to one session. Only the token's hash is kept."""

    session = models.ForeignKey(AgentSession, on_delete=models.CASCADE, related_name="share_links")
    token_hash = models.CharField(max_length=64, unique=True)
    label = models.CharField(max_length=100, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    last_used_at = models.DateTimeField(null=True, blank=True)
    use_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("revoke_any_sharelink", "Can revoke anyone's share links")]

    def __str__(self) -> str:
        return self.label or f"link {self.pk}"

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class Watcher(models.Model):
    """Who has a session page's socket open now (one row per socket)."""

    channel_name = models.CharField(max_length=200, primary_key=True)
    session = models.ForeignKey(AgentSession, on_delete=models.CASCADE, related_name="watchers")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    share_link = models.ForeignKey(
        ShareLink, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    seen_at = models.DateTimeField(default=timezone.now, db_index=True)


class AuditEntry(models.Model):
    """Mutations that have no session timeline to live in: people, roles, links, sandboxes."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    action = models.CharField(max_length=64)
    target = models.CharField(max_length=200, blank=True)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "audit entries"
        permissions = [("manage_people", "Can manage people and their roles")]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M} {self.action} {self.target}"


class BridgeWorker(models.Model):
    """A process that runs bridges (`manage.py bridges` or `serve`), seen every few seconds.

    Lets the web side know whether anything will record a new session, and lets operators
    see which workers hold which leases (`AgentSession.bridge_owner`)."""

    name = models.CharField(max_length=64, primary_key=True)
    seen_at = models.DateTimeField()
    started_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.name
