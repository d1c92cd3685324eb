"""What a webhook delivery says, how it is signed, and the hooks configured as code.

Each POST carries:

- `X-Porthole-Event`: the kind (`session.started`, `session.finished`, `session.failed`,
  `session.needs_attention`, `session.lost`);
- `X-Porthole-Delivery`: the delivery's id, the same on every retry (receivers dedupe on it);
- `X-Porthole-Signature: t=<unix seconds>,v1=<hex>`: HMAC-SHA256 with the hook's secret over
  `"<t>.<the exact request body>"`. Verify by recomputing it, comparing in constant time, and
  rejecting a `t` too far from your clock (replays). See `verify()` and docs/awareness.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction

from dashboard.agents.models import AgentSession
from dashboard.awareness.models import Hook, Kind

SIGNATURE_HEADER = "X-Porthole-Signature"
EVENT_HEADER = "X-Porthole-Event"
DELIVERY_HEADER = "X-Porthole-Delivery"
TOLERANCE_SECONDS = 300

HEADLINES = {
    Kind.STARTED: "started",
    Kind.FINISHED: "finished",
    Kind.FAILED: "failed",
    Kind.NEEDS_ATTENTION: "needs attention",
    Kind.LOST: "was lost",
}


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(
    secret: str, body: bytes, header: str, *, tolerance: int = TOLERANCE_SECONDS, now: float = 0
) -> bool:
    """What a receiver does (in any language): the reference, and what the tests use."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - t) > tolerance:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def _slack_escape(text: str) -> str:
    """Slack reads <...> as links and mentions (<!channel>): sandbox text must not be one."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def session_url(session: AgentSession) -> str:
    base = settings.PORTHOLE_PUBLIC_URL.rstrip("/")
    return f"{base}{session.get_absolute_url()}" if base else session.get_absolute_url()


def payload(
    kind: str, session: AgentSession, *, occurrence: int, reasons: list[str] | None = None
) -> dict[str, Any]:
    """The JSON body; `text` makes a Slack (or Mattermost, Discord /slack) incoming-webhook URL
    work as is."""
    title = session.title or session.upstream_id
    url = session_url(session)
    starter = session.started_by.get_username() if session.started_by else ""
    headline = f"Session {_slack_escape(title)!s} {HEADLINES.get(Kind(kind), kind)}"
    if url.startswith("http"):
        headline = f"<{url}|{_slack_escape(title)}> {HEADLINES.get(Kind(kind), kind)}"
    details = [_slack_escape(reason) for reason in reasons or []]
    if session.exit_code is not None and kind in (Kind.FAILED, Kind.FINISHED):
        details.append(f"exit code {session.exit_code}")
    text = headline + (f": {'; '.join(details)}" if details else "")
    if starter:
        text += f" (started by {_slack_escape(starter)})"
    return {
        "kind": kind,
        "text": text,
        "occurrence": occurrence,
        "session": {
            "id": str(session.id),
            "title": title,
            "url": url,
            "status": session.status,
            "exit_code": session.exit_code,
            "model": session.model,
            "started_by": starter,
            "started_at": session.started_at.isoformat(),
            "ended_at": session.ended_at.isoformat() if session.ended_at else None,
            "cost_usd": str(session.total_cost_usd),
            "turns": session.num_turns,
            "input_tokens": session.input_tokens,
            "output_tokens": session.output_tokens,
        },
        "reasons": reasons or [],
    }


def body_of(delivery_payload: dict[str, Any], delivery_id: str) -> bytes:
    return json.dumps(
        {"id": delivery_id, **delivery_payload}, ensure_ascii=False, separators=(",", ":")
    ).encode()


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImproperlyConfigured(f"PORTHOLE_WEBHOOK_URLS: {url!r} is not an http(s) URL")
    return url


def ensure_env_hooks() -> list[Hook]:
    """Add the hooks PORTHOLE_WEBHOOK_URLS lists (idempotent, safe from several workers at
    once), and switch off the ones it no longer lists."""
    urls = [check_url(url) for url in settings.PORTHOLE_WEBHOOK_URLS]
    hooks = []
    for url in urls:
        try:
            with transaction.atomic():
                hook, created = Hook.objects.get_or_create(
                    url=url,
                    source=Hook.Source.ENV,
                    defaults={"description": "from PORTHOLE_WEBHOOK_URLS"},
                )
        except IntegrityError:  # another worker added it between our get and our create
            hook = Hook.objects.get(url=url, source=Hook.Source.ENV)
        changes: dict[str, object] = {}
        if not hook.active:
            changes["active"] = True
        if settings.PORTHOLE_WEBHOOK_SECRET and hook.secret != settings.PORTHOLE_WEBHOOK_SECRET:
            changes["secret"] = settings.PORTHOLE_WEBHOOK_SECRET
        if changes:
            Hook.objects.filter(pk=hook.pk).update(**changes)
            hook.refresh_from_db()
        hooks.append(hook)
    Hook.objects.filter(source=Hook.Source.ENV, active=True).exclude(url__in=urls).update(
        active=False
    )
    return hooks
