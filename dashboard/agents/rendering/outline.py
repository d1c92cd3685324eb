"""The session page's outline: each prompt, each turn's result, each error and each gap, to
jump to. Built from the stored events' columns (type, subtype) and, for the few kinds that
need their text, from small raw lines only: a hostile agent's megabyte error line costs the
outline nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q

from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering.base import _number, _str, one_line

MAX_ENTRIES = 400  # the most recent ones
PARSE_MAX = 20_000  # raw lines longer than this are labelled without being parsed

_WANTED = (
    Q(source=Event.Source.DASHBOARD, type="prompt")
    | Q(source=Event.Source.AGENT, type__in=("result", "error"))
    | Q(source=Event.Source.BRIDGE, type__in=("gap", "lost", "exit"))
)


@dataclass(frozen=True)
class OutlineEntry:
    seq: int
    kind: str  # prompt | result | error | gap
    label: str
    time: datetime | None


def _data(event: Event) -> dict[str, object]:
    data = event.data if len(event.raw) <= PARSE_MAX else None
    return data if isinstance(data, dict) else {}


def entry_for(event: Event) -> OutlineEntry | None:
    """The outline's line for `event`, or None when it has none."""
    source, kind, subtype = event.source, event.type, event.subtype
    label = ""
    if source == Event.Source.DASHBOARD and kind == "prompt":
        entry_kind, label = "prompt", one_line(_str(_data(event), "text"), 80) or "prompt"
    elif source == Event.Source.AGENT and kind == "result":
        failed = subtype.startswith("error") or _data(event).get("is_error") is True
        entry_kind = "error" if failed else "result"
        cost = _number(_data(event), "total_cost_usd")
        label = (subtype or "result").replace("_", " ") + (f" · ${cost:.4f}" if cost else "")
    elif source == Event.Source.AGENT and kind == "error":
        entry_kind, label = "error", one_line(_str(_data(event), "message"), 80) or "agent error"
    elif source == Event.Source.BRIDGE and kind == "gap":
        entry_kind, label = "gap", "output lost"
    elif source == Event.Source.BRIDGE and kind == "lost":
        entry_kind, label = "error", "connection to the sandbox lost"
    elif source == Event.Source.BRIDGE and kind == "exit":
        code = _data(event).get("code")
        if code == 0:
            return None
        entry_kind, label = "error", f"process exited with code {code}"
    else:
        return None
    return OutlineEntry(event.seq, entry_kind, label, event.created_at)


def outline(session: AgentSession) -> list[OutlineEntry]:
    events = list(Event.objects.filter(_WANTED, session=session).order_by("-seq")[:MAX_ENTRIES])
    entries = [entry_for(event) for event in reversed(events)]
    return [entry for entry in entries if entry is not None]
