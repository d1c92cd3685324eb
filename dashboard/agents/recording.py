"""Storing events once, in order, and telling every viewer.

Both the bridge (agent output) and the views (attributed actions) append through
`append_events`: it takes the session's row lock, hands out the next seqs and inserts
in one transaction, so seqs are gap-free whichever worker writes. A bridge passes its
lease owner and the write is refused once another worker holds the lease: that, with
the unique `(session, seq)`, is the fence against a stale bridge.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard.agents import upstream
from dashboard.agents.forms import controls_context
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering import ToolIndex, render_event_oob

log = logging.getLogger(__name__)

SESSIONS_GROUP = "sessions"


def session_group(session_id: object) -> str:
    return f"session.{session_id}"


def user_group(user_id: object) -> str:
    """Every socket of one person, to close them when their access is taken away."""
    return f"user.{user_id}"


def bridge_group(session_id: object) -> str:
    return f"bridge.{session_id}"


class LeaseLost(Exception):
    """Another worker owns this session's bridge now; this one must stop writing."""


@dataclass
class NewEvent:
    source: str
    raw: str
    type: str = ""
    subtype: str = ""
    actor_id: int | None = None
    data: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_line(cls, source: str, raw: str, data: dict[str, Any] | None) -> NewEvent:
        raw, data = _without_secrets(raw, data)
        if source == Event.Source.STDERR:
            return cls(source=source, raw=raw, type="stderr")
        kind = data.get("type") if data else None
        subtype = data.get("subtype") if data else None
        return cls(source=source, raw=raw, type=_label(kind), subtype=_label(subtype), data=data)

    @classmethod
    def ours(cls, source: str, data: dict[str, Any], actor_id: int | None = None) -> NewEvent:
        return cls(
            source=source,
            raw=json.dumps(data, ensure_ascii=False),
            type=str(data.get("type", "")),
            actor_id=actor_id,
            data=data,
        )


REDACTED = "[redacted]"


def _secret_forms() -> tuple[str, ...]:
    return _forms_of(upstream.secrets())


@functools.lru_cache(maxsize=8)
def _forms_of(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """The API key as it may appear in a line: as is, JSON-escaped, URL-quoted. Cached:
    every line the bridge reads asks for them."""
    forms: set[str] = set()
    for secret in secrets:
        forms |= {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote(secret)}
    return tuple(sorted(forms, key=len, reverse=True))


def mask_secrets(text: str) -> str:
    """The text with every form of the API key replaced (the same object when there is none)."""
    forms = _secret_forms()
    if not any(form in text for form in forms):
        return text
    for form in forms:
        text = text.replace(form, REDACTED)
    return text


def _without_secrets(raw: str, data: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """Mask the API key in what a sandbox printed, before it is stored.

    A sandbox's processes can read what the server's user can (its command line, its
    environment), so an agent may print the key. Masking at storage keeps it out of every
    page, socket and export; replayed lines are masked the same way before they are lined
    up with stored ones, so alignment still matches.
    """
    masked = mask_secrets(raw)
    if masked is raw:
        return raw, data
    raw = masked
    if data is not None:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        data = parsed if isinstance(parsed, dict) else None
    return raw, data


def _label(value: object) -> str:
    """A type or subtype fit for an indexed column: a JSON `"\\udfff"` is a lone surrogate,
    which no database encoding accepts."""
    if not isinstance(value, str):
        return ""
    return value.encode("utf-8", "replace").decode("utf-8")[:64]


def _as_decimal(value: object) -> Decimal:
    try:
        return Decimal(str(value)) if isinstance(value, int | float | str) else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def _as_int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and value >= 0 else 0


def apply_to_session(session: AgentSession, event: NewEvent) -> None:
    """Let the session's status and totals follow what the stream says."""
    data = event.data or {}
    if event.source == Event.Source.AGENT:
        if event.type == "system" and event.subtype == "init":
            session.status = AgentSession.Status.WORKING
            model = data.get("model")
            if isinstance(model, str) and model:
                session.model = model[:128]
            claude_id = data.get("session_id")
            if isinstance(claude_id, str) and claude_id and not session.claude_session_id:
                session.claude_session_id = claude_id[:128]
        elif event.type == "ready" and session.status == AgentSession.Status.STARTING:
            session.status = AgentSession.Status.IDLE
        elif event.type == "result":
            session.total_cost_usd += _as_decimal(data.get("total_cost_usd"))
            session.num_turns += _as_int(data.get("num_turns"))
            session.duration_ms += _as_int(data.get("duration_ms"))
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            session.input_tokens += _as_int(usage.get("input_tokens"))
            session.output_tokens += _as_int(usage.get("output_tokens"))
        elif event.type == "turn_complete":
            session.status = AgentSession.Status.IDLE
            claude_id = data.get("claude_session_id")
            if isinstance(claude_id, str) and claude_id:
                session.claude_session_id = claude_id[:128]
        elif event.type == "interrupted" and session.is_live:
            session.status = AgentSession.Status.IDLE
    elif event.source == Event.Source.DASHBOARD:
        if event.type == "prompt" and session.is_live:
            session.status = AgentSession.Status.WORKING
    elif event.source == Event.Source.BRIDGE:
        if event.type == "exit":
            code = data.get("code")
            session.exit_code = code if isinstance(code, int) else None
            session.status = (
                AgentSession.Status.KILLED if session.kill_requested else AgentSession.Status.EXITED
            )
            session.ended_at = timezone.now()
        elif event.type == "lost":
            session.status = AgentSession.Status.LOST
            session.ended_at = timezone.now()


@dataclass
class Appended:
    session: AgentSession
    events: list[Event]
    state_changed: bool


STATE_FIELDS = (
    "status",
    "model",
    "claude_session_id",
    "exit_code",
    "total_cost_usd",
    "num_turns",
    "duration_ms",
    "input_tokens",
    "output_tokens",
    "ended_at",
)


def _state(session: AgentSession) -> tuple[object, ...]:
    return tuple(getattr(session, name) for name in STATE_FIELDS)


def append_events(
    session_id: object,
    new_events: Sequence[NewEvent],
    *,
    lease_owner: str | None = None,
    lease_seconds: float | None = None,
) -> Appended:
    """Store events with the next seqs; apply them to the session. Refuses a stale bridge."""
    now = timezone.now()
    with transaction.atomic():
        session = (
            AgentSession.objects.select_for_update().select_related("sandbox").get(id=session_id)
        )
        if lease_owner is not None:
            held = session.bridge_owner == lease_owner and (
                session.bridge_lease_until is not None and session.bridge_lease_until > now
            )
            if not held:
                raise LeaseLost(str(session_id))
            if lease_seconds:
                session.bridge_lease_until = now + timedelta(seconds=lease_seconds)
        before = _state(session)
        rows = []
        for offset, new in enumerate(new_events):
            rows.append(
                Event(
                    session=session,
                    seq=session.next_seq + offset,
                    source=new.source,
                    type=new.type,
                    subtype=new.subtype,
                    raw=new.raw,
                    actor_id=new.actor_id,
                    created_at=now,
                )
            )
            apply_to_session(session, new)
        Event.objects.bulk_create(rows)
        session.next_seq += len(rows)
        if rows:
            session.last_event_at = now
        session.save(
            update_fields=[*STATE_FIELDS, "next_seq", "last_event_at", "bridge_lease_until"]
        )
    for row, new in zip(rows, new_events, strict=True):
        if new.data is not None:
            row._data = new.data  # spare the renderer a second parse
    return Appended(session=session, events=rows, state_changed=_state(session) != before)


def render_state(session: AgentSession) -> dict[str, str]:
    """The fragments that follow a session's state, rendered once for all of its viewers:
    team members, and (showing less) share-link holders."""
    context = {"session": session, "sandbox": session.sandbox, **controls_context(session)}
    return {
        "status": render_to_string("agents/session.html#state-oob", {**context, "member": True}),
        "status_shared": render_to_string(
            "agents/session.html#state-oob", {**context, "member": False}
        ),
        "controls": render_to_string("agents/session.html#controls-oob", context),
        "row": render_to_string("agents/index.html#row", {"session": session, "oob": True}),
    }


Message = tuple[str, dict[str, Any]]


def record(
    session_id: object,
    new_events: Sequence[NewEvent],
    *,
    tools: ToolIndex | None = None,
    lease_owner: str | None = None,
    lease_seconds: float | None = None,
) -> tuple[Appended, list[Message]]:
    """Append events, render each once, and return the channel messages that announce them."""
    appended = append_events(
        session_id, new_events, lease_owner=lease_owner, lease_seconds=lease_seconds
    )
    tools = tools if tools is not None else ToolIndex()
    items = []
    for event in appended.events:
        event.session = appended.session
        tools.observe(event)
        items.append((event.seq, render_event_oob(event, tools)))
    messages: list[Message] = []
    group = session_group(appended.session.id)
    if items:
        messages.append((group, {"type": "session.events", "items": items}))
    if appended.state_changed:
        state = render_state(appended.session)
        messages.append((group, {"type": "session.state", **state}))
        messages.append(
            (
                SESSIONS_GROUP,
                {"type": "sessions.row", "session": str(appended.session.id), "html": state["row"]},
            )
        )
    return appended, messages


async def publish(messages: Iterable[Message]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    for group, message in messages:
        await layer.group_send(group, message)


def record_and_publish(
    session_id: object, new_events: Sequence[NewEvent], **kwargs: Any
) -> Appended:
    """For synchronous callers (views): store, render and announce in one call."""
    appended, messages = record(session_id, new_events, **kwargs)
    async_to_sync(publish)(messages)
    return appended
