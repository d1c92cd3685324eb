"""The session page's outline: each prompt, each turn's result, each error (a failed tool
call among them) and each gap, to jump to; and where the session's first error is. Built
from the stored events' columns (type, subtype) and, for the few kinds that need their
text, from small raw lines only: a hostile agent's megabyte error line costs the outline
nothing.

Neither answer may cost a scan of a long session on every page load (the columns they need
carry no index), and recorded events never change and only ever come after the last one:
so each is kept in the cache with the seq it was computed through, and a request reads
only the events recorded since.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.cache import cache
from django.db.models import Q

from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering.base import _number, _str, clean_text, one_line

MAX_ENTRIES = 400  # the most recent ones
PARSE_MAX = 20_000  # raw lines longer than this are labelled without being parsed
CACHE_SECONDS = 24 * 3600
# A tool result line is parsed to confirm an error up to this size; past it, the marker the
# database found is believed (it cannot be inside a string: quotes there are escaped).
TOOL_PARSE_MAX = 1_000_000
TOOL_CANDIDATES = 50  # tool-result lines read per query while looking for the first error

# How a failed tool result's line reads, as the Python and TypeScript SDKs write JSON (inside
# a string its quotes would be escaped).
_TOOL_ERROR_MARKS = ('"is_error": true', '"is_error":true')
_TOOL_ERROR = Q(raw__contains=_TOOL_ERROR_MARKS[0]) | Q(raw__contains=_TOOL_ERROR_MARKS[1])
_WANTED = (
    Q(source=Event.Source.DASHBOARD, type__in=("prompt", "action_failed"))
    | Q(source=Event.Source.AGENT, type__in=("result", "error"))
    | Q(source=Event.Source.BRIDGE, type__in=("gap", "lost", "exit"))
    | (Q(source=Event.Source.AGENT, type="user") & _TOOL_ERROR)
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
    elif source == Event.Source.DASHBOARD and kind == "action_failed":
        action = one_line(_str(_data(event), "action"), 30) or "action"
        entry_kind, label = "error", f"{action} failed"
    elif source == Event.Source.AGENT and kind == "result":
        failed = subtype.startswith("error") or _data(event).get("is_error") is True
        entry_kind = "error" if failed else "result"
        cost = _number(_data(event), "total_cost_usd")
        said = one_line(clean_text(subtype), 64) or "result"
        label = said.replace("_", " ") + (f" · ${cost:.4f}" if cost else "")
    elif source == Event.Source.AGENT and kind == "user":
        failure = _tool_failure(event)
        if failure is None:
            return None
        entry_kind, label = "error", failure
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
        entry_kind, label = (
            "error",
            f"process exited with code {one_line(clean_text(str(code)), 20)}",
        )
    else:
        return None
    return OutlineEntry(event.seq, entry_kind, label, event.created_at)


def _tool_failure(event: Event) -> str | None:
    """The label of a tool result line that reports a failed call, else None."""
    if len(event.raw) > PARSE_MAX:  # not parsed: the marker says it (see `_TOOL_ERROR`)
        return "tool call failed" if any(m in event.raw for m in _TOOL_ERROR_MARKS) else None
    message = _data(event).get("message")
    content = message.get("content") if isinstance(message, dict) else None
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and "tool_use_id" in block and block.get("is_error") is True:
            said = block.get("content")
            if isinstance(said, list):  # text blocks
                said = " ".join(_str(part, "text") for part in said if isinstance(part, dict))
            reason = one_line(clean_text(said), 60) if isinstance(said, str) else ""
            return f"tool call failed: {reason}" if reason else "tool call failed"
    return None


def last_seq(session_id: Any) -> int:
    """The session's newest seq (0 before any event), from the (session, seq) index alone."""
    newest = (
        Event.objects.filter(session_id=session_id)
        .order_by("-seq")
        .values_list("seq", flat=True)
        .first()
    )
    return newest or 0


def outline(session: AgentSession, through: int | None = None) -> list[OutlineEntry]:
    """The outline's entries, oldest first (the most recent MAX_ENTRIES), up to seq `through`
    when given: a page's outline ends at the page's last seq, since whatever was recorded
    after it reaches the page live, outline entry included."""
    key = f"porthole:outline:v3:{session.pk}"  # v3: failed tool calls are entries
    cached, entries = cache.get(key) or (0, ())
    tail = last_seq(session.pk)  # first: what is recorded meanwhile is read next time
    if tail > cached:
        events = Event.objects.filter(_WANTED, session=session, seq__gt=cached, seq__lte=tail)
        recent = list(events.order_by("-seq")[:MAX_ENTRIES])
        found = [e for e in map(entry_for, reversed(recent)) if e is not None]
        entries = (*entries, *found)[-MAX_ENTRIES:]
        cache.set(key, (tail, entries), CACHE_SECONDS)
    return [entry for entry in entries if through is None or entry.seq <= through]


def _failed_tool_result(event: Event) -> bool:
    if len(event.raw) > TOOL_PARSE_MAX:
        return True
    message = (event.data or {}).get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(block, dict) and "tool_use_id" in block and block.get("is_error") is True
        for block in content
    )


def _first_error_between(session_id: Any, after: int, through: int) -> int | None:
    """The seq of the first error in (after, through]: a failed result, an agent error, a
    lost connection, a non-zero exit, an action that failed, or a failed tool call."""
    wanted = Event.objects.filter(_WANTED, session_id=session_id, seq__gt=after, seq__lte=through)
    found: int | None = None
    for event in wanted.order_by("seq").iterator(chunk_size=100):
        entry = entry_for(event)
        if entry is not None and entry.kind == "error":
            found = event.seq
            break
    # A failed tool call before that: the database picks the lines, Python confirms them.
    ceiling = found - 1 if found is not None else through
    tool_results = Event.objects.filter(
        _TOOL_ERROR, session_id=session_id, source=Event.Source.AGENT, type="user"
    )
    while after < ceiling:
        candidates = list(
            tool_results.filter(seq__gt=after, seq__lte=ceiling).order_by("seq")[:TOOL_CANDIDATES]
        )
        for event in candidates:
            if _failed_tool_result(event):
                return event.seq
        if len(candidates) < TOOL_CANDIDATES:
            break
        after = candidates[-1].seq
    return found


def first_error(session: AgentSession) -> int | None:
    """The seq of the session's first error, or None when it has had none so far."""
    key = f"porthole:first-error:v1:{session.pk}"
    through, found = cache.get(key) or (0, None)
    if found is not None:
        return int(found)
    tail = last_seq(session.pk)
    if tail > through:
        found = _first_error_between(session.pk, through, tail)
        cache.set(key, (tail, found), CACHE_SECONDS)
    return found
