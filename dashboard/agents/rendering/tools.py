"""Tool calls and their results, across events: a result names only a `tool_use_id`, and
its card must find the call it answers (in memory, or in the database when the call lies
outside what was rendered). The page layout lives here too (which card or fold draws which
event), because it is decided from the same index; together just over 400 lines."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction

from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering.base import _dict, _list, _str, accent, clean_text, dom_id, one_line
from dashboard.agents.rendering.budget import PageBudget

log = logging.getLogger(__name__)


# Subagents nest their calls inside the Task card that started them, this many levels deep;
# deeper ones are shown at top level (with a link to their Task) so that a hostile chain of
# nested calls cannot nest the page without bound.
MAX_DEPTH = 4
# The tools whose calls run a subagent (Claude Code renamed Task to Agent).
TASK_NAMES = ("Task", "Agent")


@dataclass(frozen=True)
class ToolRef:
    id: str
    name: str
    summary: str
    seq: int | None  # the event holding the call; None when not known
    time: datetime | None = None  # when the call was recorded (for the duration)
    parent: str = ""  # the Task call whose subagent made this call
    depth: int = 0  # how many Task cards this call's card sits in

    @property
    def dom_id(self) -> str:
        return dom_id(self.id)

    @property
    def nests(self) -> bool:
        """Whether its card holds the events of a subagent (that name it as their parent)
        at a depth still allowed."""
        return self.name in TASK_NAMES and self.depth < MAX_DEPTH

    @property
    def accent(self) -> int:
        return accent(self.id)


@dataclass(frozen=True)
class ToolOutcome:
    seq: int  # the event holding the result
    is_error: bool
    time: datetime | None = None


@dataclass(frozen=True)
class ToolStatus:
    """The marker on a tool call card; also swapped out-of-band when its result arrives."""

    dom_id: str
    state: str  # running | done | error | missing (no result and the session is over)
    result_seq: int | None = None
    duration: str = ""  # from the call to its result, when both times are known


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    seconds = max((end - start).total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s"


# Agent events that say little to a reader: folded into one "N system events" line.
_KNOWN_TYPES = {
    "assistant",
    "user",
    "system",
    "result",
    "turn_complete",
    "ready",
    "configured",
    "interrupted",
    "error",
    "tool_use_summary",
}
_MEANINGFUL_SYSTEM = {"init", "compact_boundary"}


def is_noise(event: Event) -> bool:
    """Unknown agent events, streaming partials, progress ticks and system messages other
    than init and compaction. Folded on the page; never dropped from the record."""
    if event.source != Event.Source.AGENT:
        return False
    data = event.data
    if data is None:
        return False  # a malformed line is worth seeing
    kind = data.get("type")
    if kind == "system":
        return data.get("subtype") not in _MEANINGFUL_SYSTEM
    return kind not in _KNOWN_TYPES


def parent_of(event: Event) -> str:
    data = event.data if event.source == Event.Source.AGENT else None
    return _str(data, "parent_tool_use_id") if data is not None else ""


def _tool_summary(name: str, tool_input: dict[str, Any]) -> str:
    """What a tool call is about, in one line: the command, the path, the pattern…"""
    keys = (
        "command",
        "file_path",
        "notebook_path",
        "pattern",
        "path",
        "url",
        "query",
        "description",
        "prompt",
        "skill",
    )
    for key in keys:
        value = _str(tool_input, key)
        if value:
            return one_line(value)
    if name == "TodoWrite":
        return f"{len(_list(tool_input, 'todos'))} todos"
    first = next((v for v in tool_input.values() if isinstance(v, str) and v.strip()), "")
    return one_line(clean_text(first))


def _content_blocks(data: dict[str, Any]) -> list[dict[str, Any]]:
    content = _dict(data, "message").get("content")
    if not isinstance(content, list):
        return []
    return [block for block in content if isinstance(block, dict)]


class ToolIndex:
    """tool_use id → the call (name, summary, event seq), and which calls have a result.

    The bridge keeps one for a session's whole life, so both maps are bounded (oldest
    forgotten first); a forgotten call is looked up in the database when a result needs it.
    """

    MAX_ENTRIES = 5_000
    # Database look-ups per index: a hostile stream naming thousands of unknown tool ids
    # must not turn into thousands of queries.
    MAX_LOOKUPS = 100
    # How far (in events) a look-up searches from the event that needs it: keeps each
    # query's scan bounded however long the session.
    LOOKUP_WINDOW = 20_000

    def __init__(self) -> None:
        self._tools: OrderedDict[str, ToolRef] = OrderedDict()
        self.results: OrderedDict[str, ToolOutcome] = OrderedDict()
        self._inits: OrderedDict[str, int] = OrderedDict()  # claude session id → first seq
        self._looked_up: set[str] = set()
        self._lookups = 0
        # Shared by the events of one page render (see `budget`); None for the bridge's
        # long-lived index, whose events each render once.
        self.page_budget: PageBudget | None = None
        # A page render's layout (see `_lay_out`): events drawn inside something else (a
        # Task card, a call's card, a fold) → the id of the element holding them.
        self.absorbed: dict[int, str] = {}
        self.paired: set[int] = set()  # events made only of results shown in their calls' cards
        self.children: dict[str, list[Event]] = {}  # Task call id → its subagent's events
        self.folds: dict[int, list[Event]] = {}  # first seq of a run of noise → the run
        self.result_blocks: dict[str, tuple[Event, dict[str, Any]]] = {}
        self._page_seqs: set[int] = set()
        # Live: the run of noise at the end of the timeline (first seq, count), if any.
        self.fold: tuple[int, int] | None = None

    def forget(self) -> None:
        """Drop what was learned (a batch rendered and then rolled back taught it): calls
        are looked up again as results need them, and a run of noise starts a new fold."""
        self._tools.clear()
        self.results.clear()
        self._inits.clear()
        self._looked_up.clear()  # the count of look-ups still bounds them
        self.fold = None

    # Learning -----------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Learn the tool calls and results in one event. Never raises."""
        try:
            self._observe(event)
        except Exception:
            log.exception("tool index: could not observe event %s", getattr(event, "seq", "?"))

    def _observe(self, event: Event) -> None:
        if event.source != Event.Source.AGENT:
            return
        data = event.data
        if data is None:
            return
        kind = data.get("type")
        if kind == "assistant":
            for block in _content_blocks(data):
                if block.get("type") in ("tool_use", "server_tool_use", "mcp_tool_use"):
                    self._add_tool(block, event, _str(data, "parent_tool_use_id"))
                elif _str(block, "tool_use_id"):  # server tool results live in assistant turns
                    self._add_result(block, event)
        elif kind == "user":
            for block in _content_blocks(data):
                if block.get("type") == "tool_result" or _str(block, "tool_use_id"):
                    self._add_result(block, event)
        elif kind == "system" and data.get("subtype") == "init":
            session_id = _str(data, "session_id")
            if session_id and session_id not in self._inits:
                self._put(self._inits, session_id, event.seq)

    def _add_tool(self, block: dict[str, Any], event: Event, parent: str) -> None:
        tool_id = _str(block, "id")
        if not tool_id:
            return
        name = _str(block, "name") or "tool"
        outer = self._tools.get(parent) if parent else None
        depth = (outer.depth + 1 if outer is not None else 1) if parent else 0
        ref = ToolRef(
            tool_id,
            one_line(name, 60),
            _tool_summary(name, _dict(block, "input")),
            event.seq,
            event.created_at,
            parent,
            depth,
        )
        self._put(self._tools, tool_id, ref)

    def _add_result(self, block: dict[str, Any], event: Event) -> None:
        tool_id = _str(block, "tool_use_id")
        if tool_id:
            outcome = ToolOutcome(event.seq, block.get("is_error") is True, event.created_at)
            self._put(self.results, tool_id, outcome)

    def _put(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.MAX_ENTRIES:
            table.popitem(last=False)

    # Asking -------------------------------------------------------------------------

    def get(self, tool_use_id: str) -> ToolRef | None:
        return self._tools.get(tool_use_id)

    def resolve(self, event: Event, tool_use_id: str) -> ToolRef | None:
        """The call a result (or a subagent message) refers to, from memory or the database."""
        ref = self._tools.get(tool_use_id)
        if ref is None and self._may_look_up(tool_use_id):
            self._load_matching(event.session_id, tool_use_id, seq_lt=event.seq, kind="assistant")
            ref = self._tools.get(tool_use_id)
        return ref

    def status(self, event: Event, ref: ToolRef) -> ToolStatus:
        outcome = self.results.get(ref.id)
        if outcome is not None:
            state = "error" if outcome.is_error else "done"
            return ToolStatus(ref.dom_id, state, outcome.seq, duration(ref.time, outcome.time))
        session = _cached_session(event)
        if session is not None and not session.is_live:
            return ToolStatus(ref.dom_id, "missing")
        return ToolStatus(ref.dom_id, "running")

    def first_init_seq(self, session_id: str) -> int | None:
        return self._inits.get(session_id)

    def _may_look_up(self, tool_use_id: str) -> bool:
        if tool_use_id in self._looked_up or self._lookups >= self.MAX_LOOKUPS:
            return False
        self._looked_up.add(tool_use_id)
        self._lookups += 1
        return True

    def _load_matching(
        self,
        session_id: Any,
        tool_use_id: str,
        *,
        kind: str,
        seq_lt: int | None = None,
        seq_gt: int | None = None,
    ) -> None:
        """Observe the few stored events whose raw line mentions this id (a cheap text
        filter; observing them checks properly)."""
        try:
            # The bridge renders inside the transaction that stores a batch, where a failed
            # query would otherwise undo the batch: a savepoint there.
            guard = transaction.atomic() if connection.in_atomic_block else nullcontext()
            with guard:
                self._observe_matching(session_id, tool_use_id, kind, seq_lt, seq_gt)
        except Exception:
            # E.g. called from async code, or the database is gone: render without pairing.
            log.warning("tool index: look-up of %r failed", tool_use_id[:80], exc_info=True)

    def _observe_matching(
        self, session_id: Any, tool_use_id: str, kind: str, seq_lt: int | None, seq_gt: int | None
    ) -> None:
        events = Event.objects.filter(
            session_id=session_id,
            source=Event.Source.AGENT,
            type=kind,
            raw__contains=json.dumps(tool_use_id),
        )
        if seq_lt is not None:
            events = events.filter(seq__lt=seq_lt, seq__gte=seq_lt - self.LOOKUP_WINDOW).order_by(
                "-seq"
            )
        if seq_gt is not None:
            events = events.filter(seq__gt=seq_gt, seq__lte=seq_gt + self.LOOKUP_WINDOW).order_by(
                "seq"
            )
        for found in events[:3]:
            self._observe(found)

    @classmethod
    def for_session(cls, session: AgentSession, events: Iterable[Event]) -> ToolIndex:
        """The index a page render needs for `events` (a slice of the session's events):
        what they hold, plus calls and results that lie outside the slice."""
        index = cls()
        events = list(events)
        for event in events:
            index.observe(event)
        if not events:
            return index
        index.page_budget = PageBudget()
        index._lay_out(events)
        last_seq = max(event.seq for event in events)
        # Results whose call is older than the slice.
        for event in events:
            for tool_id in index._result_ids(event):
                if tool_id not in index._tools and index._may_look_up(tool_id):
                    index._load_matching(session.id, tool_id, seq_lt=event.seq, kind="assistant")
        # Calls whose result is newer than the slice (loading older pages).
        if last_seq < session.next_seq - 1:
            for ref in list(index._tools.values()):
                if ref.id not in index.results and index._may_look_up(ref.id):
                    index._load_matching(session.id, ref.id, seq_gt=last_seq, kind="user")
        return index

    # Layout of a page render --------------------------------------------------------

    def _lay_out(self, events: list[Event]) -> None:
        """Where each event of a page is drawn: a subagent's events inside their Task's
        card, results inside their calls' cards, runs of noise in one fold; everything else
        at top level. Rendering an absorbed event at top level gives only a hidden seq mark
        (the page's bookkeeping of what it holds)."""
        self._page_seqs = {event.seq for event in events}
        fold_head: int | None = None
        for event in sorted(events, key=lambda e: e.seq):
            parent = self.on_page(parent_of(event), before=event.seq)
            if parent is not None and parent.nests:
                self.children.setdefault(parent.id, []).append(event)
                self.absorbed[event.seq] = f"toolcall-{parent.dom_id}"
                if self._pair(event) is not None:
                    self.paired.add(event.seq)
                continue
            answered = self._pair(event)
            if answered is not None:
                self.paired.add(event.seq)
                self.absorbed[event.seq] = f"toolcall-{answered.dom_id}"
                continue
            if is_noise(event):
                if fold_head is None:
                    fold_head = event.seq
                    self.folds[fold_head] = [event]
                else:
                    self.folds[fold_head].append(event)
                    self.absorbed[event.seq] = f"fold-{fold_head}"
                continue
            fold_head = None

    def on_page(self, tool_use_id: str, *, before: int) -> ToolRef | None:
        """The call, if its card is drawn on this page above `before`."""
        ref = self._tools.get(tool_use_id) if tool_use_id else None
        if ref is None or ref.seq is None or ref.seq not in self._page_seqs or ref.seq >= before:
            return None
        return ref

    def _pair(self, event: Event) -> ToolRef | None:
        """When `event` is only results whose calls' cards are on this page, the first of
        those calls (the results are then drawn in their cards); else None."""
        data = event.data if event.source == Event.Source.AGENT else None
        if data is None or data.get("type") != "user" or _str(data, "error"):
            return None
        content = _dict(data, "message").get("content")
        if not isinstance(content, list) or not content:
            return None
        found: list[tuple[ToolRef, dict[str, Any]]] = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "tool_result":
                return None
            ref = self.on_page(_str(block, "tool_use_id"), before=event.seq)
            if ref is None:
                return None
            found.append((ref, block))
        for ref, block in found:
            self.result_blocks[ref.id] = (event, block)
        return found[0][0]

    @staticmethod
    def _result_ids(event: Event) -> list[str]:
        data = event.data
        if event.source != Event.Source.AGENT or data is None or data.get("type") != "user":
            return []
        return [
            _str(block, "tool_use_id")
            for block in _content_blocks(data)
            if _str(block, "tool_use_id")
        ]


def _cached_session(event: Event) -> AgentSession | None:
    """The event's session if already loaded: rendering must not query just for a badge."""
    return event.session if Event.session.is_cached(event) else None
