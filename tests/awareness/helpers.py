"""Sessions and events for the awareness tests, stored through the real recording path."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import User

from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.recording import NewEvent, append_events


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def new_session(
    *, title: str = "a task", user: User | None = None, model: str = "", **fields: Any
) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=f"sbx-{uuid.uuid4().hex[:12]}")
    return AgentSession.objects.create(
        sandbox=sandbox,
        upstream_id=f"ses-{uuid.uuid4().hex[:12]}",
        title=title,
        prompt=title,
        started_by=user,
        model=model,
        **fields,
    )


def agent(data: dict[str, Any] | str) -> NewEvent:
    raw = data if isinstance(data, str) else json.dumps(data)
    parsed = json.loads(raw)
    return NewEvent.from_line(Event.Source.AGENT, raw, parsed if isinstance(parsed, dict) else None)


def ours(source: str, data: dict[str, Any], actor: User | None = None) -> NewEvent:
    return NewEvent.ours(source, data, actor_id=actor.pk if actor else None)


def record(session: AgentSession, *events: NewEvent) -> AgentSession:
    append_events(session.id, list(events))
    return AgentSession.objects.get(pk=session.pk)


def result(
    *,
    cost: str = "0",
    turns: int = 1,
    subtype: str = "success",
    is_error: bool = False,
    tokens: tuple[int, int] = (0, 0),
    text: str = "done",
) -> NewEvent:
    # The raw line as the SDK writes it: the cost as a JSON number, exactly as given.
    fields = [
        f'"type": "result", "subtype": {json.dumps(subtype)}',
        f'"is_error": {"true" if is_error else "false"}, "duration_ms": 10',
        f'"num_turns": {turns}, "result": {json.dumps(text)}',
        f'"total_cost_usd": {Decimal(cost)}',
        f'"usage": {{"input_tokens": {tokens[0]}, "output_tokens": {tokens[1]}}}',
    ]
    raw = "{" + ", ".join(fields) + "}"
    return agent(raw)


def turn(session: AgentSession, user: User | None = None, **result_fields: Any) -> AgentSession:
    """A whole turn as the demo agent and the dashboard record it."""
    return record(
        session,
        ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go"}, user),
        agent({"type": "system", "subtype": "init", "model": session.model or "demo"}),
        agent({"type": "assistant", "message": {"content": [{"type": "text", "text": "ok"}]}}),
        result(**result_fields),
        agent({"type": "turn_complete", "claude_session_id": "c1"}),
    )
