"""Porthole's own events: dashboard actions (attributed to the person who took them) and
the bridge's observations (gaps, exits, lost and regained connections)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.core.exceptions import ObjectDoesNotExist

from dashboard.agents.models import Event
from dashboard.agents.rendering.agent import _notice, _pairs
from dashboard.agents.rendering.base import DISPLAY_CAP, _number, _str, clean_text, clip, one_line
from dashboard.agents.rendering.items import EventItem, _generic, _item
from dashboard.awareness.attention import reason_labels

# Set while rendering for share-link holders, who learn no teammate's name (they see the
# words "a teammate" instead). Only Porthole's own events name anyone, so only they need the
# second rendering (`link_holder_variant`); the agent's events are the same for everyone.
_for_link_holders: ContextVar[bool] = ContextVar("for_link_holders", default=False)


@contextmanager
def for_link_holders() -> Iterator[None]:
    """Render, within this block, as a share-link holder may see it."""
    token = _for_link_holders.set(True)
    try:
        yield
    finally:
        _for_link_holders.reset(token)


def link_holder_variant(event: Event) -> bool:
    """Whether `event` looks different to a share-link holder (it names the person)."""
    return event.source == Event.Source.DASHBOARD and event.actor_id is not None


def _actor_name(event: Event) -> str:
    if event.actor_id is None:
        return "someone"
    if _for_link_holders.get():
        return "a teammate"
    try:
        actor = event.actor
    except ObjectDoesNotExist:  # deleted between the event's load and now
        actor = None
    return clean_text(actor.get_username()) if actor is not None else "a deleted user"


def _dashboard(event: Event, data: dict[str, Any]) -> EventItem:
    who = _actor_name(event)
    kind = data.get("type")
    detail: dict[str, Any] = {"actor": who}
    match kind:
        case "prompt":
            queued = " (queued: the agent takes it when its turn ends)"
            return _item(
                event,
                "action",
                f"{who} sent a prompt" + (queued if data.get("queued") is True else ""),
                level="info",
                text=clip(_str(data, "text"), DISPLAY_CAP),
                detail=detail,
            )
        case "interrupt":
            return _item(event, "action", f"{who} interrupted", level="warn", detail=detail)
        case "kill":
            signal = _str(data, "signal")
            label = f"{who} killed the session" + (f" (signal {signal})" if signal else "")
            return _item(event, "action", label, level="error", detail=detail)
        case "sandbox_kill":
            return _item(event, "action", f"{who} killed the sandbox", level="error", detail=detail)
        case "configure":
            return _item(
                event,
                "action",
                f"{who} changed configuration",
                level="info",
                pairs=_pairs(data),
                detail=detail,
            )
        case "attach":
            return _item(event, "action", f"{who} attached", level="muted", detail=detail)
        case "acknowledged":
            why = "; ".join(reason_labels(data.get("reasons")))
            return _item(
                event,
                "action",
                f"{who} marked the session as handled",
                level="ok",
                text=clip(why, DISPLAY_CAP) if why else None,
                detail=detail,
            )
        case "continue":
            detail["session"] = _uuid(_str(data, "session"))
            detail["title"] = one_line(_str(data, "title"), 200)
            return _item(
                event, "action", f"{who} continued in a new session", level="info", detail=detail
            )
    return _generic(event)


def _uuid(value: str) -> str:
    """A session id to link to, or "" when it is not a UUID (no link then)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return ""


def _bridge(event: Event, data: dict[str, Any]) -> EventItem:
    match data.get("type"):
        case "gap":
            lost = _number(data, "lost_bytes")
            return _notice(
                event,
                "output lost",
                "warn",
                _str(data, "message") or "some output was lost before it was read",
                pairs=[("lost", f"{int(lost):,} bytes")] if lost is not None else [],
            )
        case "exit":
            code = data.get("code")
            if isinstance(code, int) and not isinstance(code, bool):
                ok = code == 0
                return _item(
                    event,
                    "notice",
                    f"process exited with code {code}",
                    level="ok" if ok else "error",
                    is_error=not ok,
                )
            return _notice(event, "process exited", "warn")
        case "lost":
            return _notice(
                event,
                "connection to the sandbox lost",
                "error",
                _str(data, "reason"),
                is_error=True,
            )
        case "reconnected":
            attempts = _str(data, "attempts")
            label = "reconnected" + (f" after {attempts} attempts" if attempts else "")
            if _str(data, "reason") == "lagging":
                # The bridge dropped the connection itself: reading fell behind the sandbox.
                label = "reconnected: reading had fallen behind the sandbox's output"
            return _notice(event, label, "muted")
    return _generic(event)
