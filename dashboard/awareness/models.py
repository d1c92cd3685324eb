"""Outgoing webhooks: the hooks an administrator configured, and every delivery to them.

A delivery row is the outbox: one per (hook, session, kind, occurrence), made unique by the
database, so however many dispatchers scan the same events, each hook is sent each
occurrence at most once. See `dispatcher.py`.
"""

from __future__ import annotations

import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class Kind(models.TextChoices):
    STARTED = "session.started", "Started"
    FINISHED = "session.finished", "Finished"
    FAILED = "session.failed", "Failed"
    NEEDS_ATTENTION = "session.needs_attention", "Needs attention"
    LOST = "session.lost", "Lost"


class Hook(models.Model):
    class Source(models.TextChoices):
        PAGE = "page", "Settings page"
        ENV = "env", "PORTHOLE_WEBHOOK_URLS"

    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=200, blank=True)
    secret = models.CharField(max_length=100, default=new_secret)
    # Empty: every kind.
    kinds = models.JSONField(default=list, blank=True)
    active = models.BooleanField(default=True)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.PAGE)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            # Several workers start at once and each adds the configured URLs.
            models.UniqueConstraint(
                fields=["url"], condition=Q(source="env"), name="unique_env_hook_url"
            ),
        ]

    def __str__(self) -> str:
        return self.description or self.url

    def wants(self, kind: str) -> bool:
        return not self.kinds or kind in self.kinds

    @property
    def kind_labels(self) -> list[str]:
        labels = dict(Kind.choices)
        return [str(labels.get(kind, kind)) for kind in self.kinds]


class Delivery(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Gave up"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    hook = models.ForeignKey(Hook, on_delete=models.CASCADE, related_name="deliveries")
    session = models.ForeignKey("agents.AgentSession", on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    # What makes this occurrence one: the event's seq for started/finished/failed/lost, the
    # seq that began the turn for needs_attention (one per turn, whatever the reasons).
    occurrence = models.BigIntegerField()
    payload = models.JSONField()
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)
    claimed_by = models.CharField(max_length=64, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["hook", "session", "kind", "occurrence"], name="unique_delivery"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} → {self.hook_id} ({self.status})"


class Cursor(models.Model):
    """How far the dispatchers have scanned the event log (one row, name "events")."""

    name = models.CharField(max_length=32, primary_key=True)
    position = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)
