"""How every recorded event looks in the timeline.

`describe` turns an `Event` into an `EventItem`: plain Python values (text, numbers, lists)
that the partials in `templates/agents/timeline.html` render with autoescaping. Nothing from
the event is marked safe here except markdown that went through `render_markdown`'s
sanitiser (DESIGN §4.3). Every string shown is capped for display; the full line stays
downloadable through the `event_raw` URL.

`ToolIndex` pairs tool calls with their results across events: a result names only a
`tool_use_id`, and the card should say which tool it answers and link back to the call.

Rendering never raises: an event that cannot be described becomes the generic escaped JSON
card, and the failure is logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.template.loader import render_to_string
from django.utils.safestring import SafeString, mark_safe

from dashboard.agents.markdown import render_markdown
from dashboard.agents.models import AgentSession, Event

log = logging.getLogger(__name__)

# Characters shown before a payload is cut, with a "show full" link to the raw line.
DISPLAY_CAP = 20_000  # prose: assistant text, thinking, result text
TOOL_CAP = 4_000  # tool inputs and results, stderr lines, JSON cards
SUMMARY_CAP = 100  # one-line summaries (tool summaries, labels)
# A result this short (and with few lines) starts expanded.
OPEN_RESULT_CHARS = 600
OPEN_RESULT_LINES = 12
# Above this many characters of raw line a generic card shows the raw text instead of
# re-serialising the parsed object: pretty-printing megabytes only to cut them is waste.
PRETTY_JSON_MAX_RAW = 4 * TOOL_CAP
ACCENTS = 6  # distinct accent colours pairing a tool call with its result
# Content blocks shown per message, and parts per tool result: a stream of a hundred
# thousand tiny blocks must not become a hundred thousand elements.
MAX_BLOCKS = 100
MAX_PARTS = 50

TIMELINE_TARGET = "#timeline"
STDERR_TARGET = "#stderr-log"

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")
_FIRST_LINE = re.compile(r"[^\s][^\r\n]*")


# ---------------------------------------------------------------------------------------
# Small, defensive helpers: the data is hostile, so no accessor assumes a type.


def clean_text(value: str) -> str:
    """Lone surrogates (valid in JSON escapes, invalid in UTF-8) would make the response or
    the WebSocket frame fail to encode; replace them."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def _str(data: Any, key: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def _dict(data: Any, key: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def _list(data: Any, key: str) -> list[Any]:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, list) else []


def _number(data: Any, key: str) -> float | None:
    value = data.get(key) if isinstance(data, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def one_line(text: str, cap: int = SUMMARY_CAP) -> str:
    """The first non-blank line, shortened: for labels and summaries. (A search, not a
    split: the text may be a megabyte.)"""
    match = _FIRST_LINE.search(text)
    line = match.group().rstrip() if match else ""
    return line if len(line) <= cap else line[: cap - 1] + "…"


def pretty_json(value: Any) -> str:
    """Indented JSON for display; a placeholder for what cannot be serialised (nesting
    deep enough to hit the recursion limit)."""
    try:
        return clean_text(json.dumps(value, indent=2, ensure_ascii=False))
    except (TypeError, ValueError, RecursionError):
        return "(too deeply nested to display; see the full payload)"


def dom_id(tool_use_id: str) -> str:
    """An id fragment safe in HTML ids and CSS selectors. Real ids (`toolu_01…`) pass as
    they are; anything else from the sandbox is hashed."""
    if _SAFE_ID.fullmatch(tool_use_id):
        return tool_use_id
    return "h" + hashlib.sha256(tool_use_id.encode("utf-8", "replace")).hexdigest()[:20]


def accent(tool_use_id: str) -> int:
    # A stable hash (not hash()): the bridge and page renders run in different processes
    # and must give a call and its result the same colour.
    digest = hashlib.sha1(tool_use_id.encode("utf-8", "replace"), usedforsecurity=False)
    return digest.digest()[0] % ACCENTS


@dataclass(frozen=True)
class Clipped:
    """Text capped for display. `total` is the full length in characters."""

    text: str
    total: int
    truncated: bool

    @property
    def lines(self) -> int:
        return self.text.count("\n") + 1


def clip(text: str, cap: int = TOOL_CAP) -> Clipped:
    text = clean_text(text)
    if len(text) <= cap:
        return Clipped(text, len(text), False)
    return Clipped(text[:cap], len(text), True)


# ---------------------------------------------------------------------------------------
# Tool calls and their results, across events.


@dataclass(frozen=True)
class ToolRef:
    id: str
    name: str
    summary: str
    seq: int | None  # the event holding the call; None when not known

    @property
    def dom_id(self) -> str:
        return dom_id(self.id)

    @property
    def accent(self) -> int:
        return accent(self.id)


@dataclass(frozen=True)
class ToolOutcome:
    seq: int  # the event holding the result
    is_error: bool


@dataclass(frozen=True)
class ToolStatus:
    """The marker on a tool call card; also swapped out-of-band when its result arrives."""

    dom_id: str
    state: str  # running | done | error | missing (no result and the session is over)
    result_seq: int | None = None


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
                    self._add_tool(block, event.seq)
                elif _str(block, "tool_use_id"):  # server tool results live in assistant turns
                    self._add_result(block, event.seq)
        elif kind == "user":
            for block in _content_blocks(data):
                if block.get("type") == "tool_result" or _str(block, "tool_use_id"):
                    self._add_result(block, event.seq)
        elif kind == "system" and data.get("subtype") == "init":
            session_id = _str(data, "session_id")
            if session_id and session_id not in self._inits:
                self._put(self._inits, session_id, event.seq)

    def _add_tool(self, block: dict[str, Any], seq: int) -> None:
        tool_id = _str(block, "id")
        if not tool_id:
            return
        name = _str(block, "name") or "tool"
        ref = ToolRef(tool_id, one_line(name, 60), _tool_summary(name, _dict(block, "input")), seq)
        self._put(self._tools, tool_id, ref)

    def _add_result(self, block: dict[str, Any], seq: int) -> None:
        tool_id = _str(block, "tool_use_id")
        if tool_id:
            self._put(self.results, tool_id, ToolOutcome(seq, block.get("is_error") is True))

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
            return ToolStatus(ref.dom_id, "error" if outcome.is_error else "done", outcome.seq)
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
            events = Event.objects.filter(
                session_id=session_id,
                source=Event.Source.AGENT,
                type=kind,
                raw__contains=json.dumps(tool_use_id),
            )
            if seq_lt is not None:
                events = events.filter(
                    seq__lt=seq_lt, seq__gte=seq_lt - self.LOOKUP_WINDOW
                ).order_by("-seq")
            if seq_gt is not None:
                events = events.filter(
                    seq__gt=seq_gt, seq__lte=seq_gt + self.LOOKUP_WINDOW
                ).order_by("seq")
            for found in events[:3]:
                self._observe(found)
        except Exception:
            # E.g. called from async code, or the database is gone: render without pairing.
            log.warning("tool index: look-up of %r failed", tool_use_id[:80], exc_info=True)

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


# ---------------------------------------------------------------------------------------
# What the templates get.


@dataclass
class TextBlock:
    html: SafeString  # sanitised markdown
    truncated: bool = False
    total: int = 0
    kind: str = "text"


@dataclass
class ThinkingBlock:
    text: Clipped | None  # None when redacted
    kind: str = "thinking"


@dataclass
class DiffLine:
    sign: str  # "-", "+" or "@" (hunk separator)
    text: str

    @property
    def css(self) -> str:
        return {"-": "del", "+": "add"}.get(self.sign, "hunk")


@dataclass
class ToolUseBlock:
    ref: ToolRef
    status: ToolStatus
    view: str  # bash | write | edit | json
    server: bool = False
    description: str = ""  # Bash's own description of the command
    code: Clipped | None = None  # bash: the command; write: the content; json: the input
    path: str = ""  # write / edit
    diff: list[DiffLine] = field(default_factory=list)
    diff_truncated: bool = False
    kind: str = "tool_use"


@dataclass
class ToolResultBlock:
    tool_use_id: str
    tool: ToolRef | None
    is_error: bool
    parts: list[Clipped]
    images: list[str]  # one short description per image block
    open: bool
    kind: str = "tool_result"

    @property
    def accent(self) -> int:
        return accent(self.tool_use_id)

    @property
    def truncated(self) -> bool:
        return any(part.truncated for part in self.parts)


@dataclass
class ImageBlock:
    description: str
    kind: str = "image"


@dataclass
class GenericBlock:
    label: str
    json: Clipped
    kind: str = "generic"


Block = TextBlock | ThinkingBlock | ToolUseBlock | ToolResultBlock | ImageBlock | GenericBlock


@dataclass
class EventItem:
    """Everything a partial needs for one event. `kind` picks the partial and is always one
    of ours, never a string from the event."""

    seq: int
    session_id: str
    source: str
    # message | init | system | result | divider | notice | action | stream | stderr | generic
    kind: str
    label: str
    time: datetime | None
    raw_size: int  # bytes of the raw line: the "show full" link says how much it is
    target: str = TIMELINE_TARGET
    level: str = ""  # notices and actions: muted | info | ok | warn | error
    is_error: bool = False
    inside: ToolRef | None = None  # the Task call a subagent message belongs to
    blocks: list[Block] = field(default_factory=list)
    text: Clipped | None = None  # the main text of notices, stderr, prompts, errors
    pairs: list[tuple[str, str]] = field(default_factory=list)  # small key/value facts
    html: SafeString | None = None  # sanitised markdown (result text)
    json: Clipped | None = None  # generic / stream / system cards
    # Per-kind extras: init {model, cwd, tools, servers, failed_servers}; result {errors};
    # action {actor, session, title}; message {more_blocks}; generic {note}.
    detail: dict[str, Any] = field(default_factory=dict)
    statuses: list[ToolStatus] = field(default_factory=list)  # OOB marker updates

    @property
    def bare(self) -> bool:
        """Only tool calls and results, at top level: the blocks are the cards, so the event
        drops its own frame and header (the time moves into the blocks)."""
        return (
            self.kind == "message"
            and bool(self.blocks)
            and self.inside is None
            and self.text is None
            and all(isinstance(b, ToolUseBlock | ToolResultBlock) for b in self.blocks)
        )

    @property
    def css(self) -> str:
        classes = ["ev", f"ev-{self.kind}", f"src-{self.source}"]
        if self.bare:
            classes.append("is-bare")
        if self.level:
            classes.append(f"lvl-{self.level}")
        if self.is_error:
            classes.append("is-error")
        if self.inside is not None:
            classes.append("is-subagent")
        return " ".join(classes)


def _item(event: Event, kind: str, label: str, **kwargs: Any) -> EventItem:
    source = event.source if event.source in Event.Source.values else "agent"
    return EventItem(
        seq=event.seq,
        session_id=str(event.session_id),
        source=source,
        kind=kind,
        label=label,
        time=event.created_at,
        raw_size=len(event.raw.encode("utf-8", "replace")),
        target=STDERR_TARGET if source == Event.Source.STDERR else TIMELINE_TARGET,
        **kwargs,
    )


def _generic(event: Event, note: str = "") -> EventItem:
    """The escaped, collapsed JSON card: unknown types, malformed lines, and failures."""
    data = event.data
    body = clip(event.raw)
    if data is not None and len(event.raw) <= PRETTY_JSON_MAX_RAW:
        with contextlib.suppress(TypeError, ValueError, RecursionError):
            body = clip(json.dumps(data, indent=2, ensure_ascii=False))
    if data is None:
        label = "malformed line" if event.source == Event.Source.AGENT else (event.type or "event")
    else:
        label = one_line(_str(data, "type"), 64) or "(no type)"
        subtype = one_line(_str(data, "subtype"), 64)
        if subtype:
            label = f"{label} · {subtype}"
    return _item(event, "generic", label, json=body, detail={"note": note})


# ---------------------------------------------------------------------------------------
# Agent events (the wrapper's stdout).


def _inside(event: Event, data: dict[str, Any], tools: ToolIndex) -> ToolRef | None:
    parent = _str(data, "parent_tool_use_id")
    if not parent:
        return None
    return tools.resolve(event, parent) or ToolRef(parent, "Task", "", None)


def _text_block(text: str) -> TextBlock:
    clipped = clip(text, DISPLAY_CAP)
    return TextBlock(render_markdown(clipped.text), clipped.truncated, clipped.total)


def _tool_use_block(event: Event, block: dict[str, Any], tools: ToolIndex) -> ToolUseBlock:
    tool_id = _str(block, "id") or f"missing-{event.seq}"
    ref = tools.get(tool_id)
    if ref is None or ref.seq != event.seq:
        name = _str(block, "name") or "tool"
        ref = ToolRef(
            tool_id, one_line(name, 60), _tool_summary(name, _dict(block, "input")), event.seq
        )
    tool_input = block.get("input")
    use = ToolUseBlock(
        ref=ref,
        status=tools.status(event, ref),
        view="json",
        server=block.get("type") != "tool_use",
    )
    if not isinstance(tool_input, dict):
        use.code = clip(pretty_json(tool_input))
        return use
    name = ref.name
    if name == "Bash" and _str(tool_input, "command"):
        use.view, use.code = "bash", clip(_str(tool_input, "command"))
        use.description = one_line(_str(tool_input, "description"), 200)
    elif name == "Write" and "content" in tool_input:
        use.view, use.path = "write", _str(tool_input, "file_path")
        use.code = clip(_str(tool_input, "content"))
    elif name in ("Edit", "MultiEdit") and _str(tool_input, "file_path"):
        use.view, use.path = "edit", _str(tool_input, "file_path")
        edits = _list(tool_input, "edits") if name == "MultiEdit" else [tool_input]
        use.diff, use.diff_truncated = _diff(edits)
    elif not _said_by_summary(tool_input, ref.summary):
        use.code = clip(pretty_json(tool_input))
    return use


def _said_by_summary(tool_input: dict[str, Any], summary: str) -> bool:
    """`{"file_path": "/a/b.py"}` says nothing the header's summary does not: skip the body."""
    values = list(tool_input.values())
    return len(values) == 1 and isinstance(values[0], str) and values[0].strip() == summary


def _diff(edits: list[Any]) -> tuple[list[DiffLine], bool]:
    """old_string lines as `-`, new_string lines as `+`, capped to TOOL_CAP characters."""
    lines: list[DiffLine] = []
    budget = TOOL_CAP
    for number, edit in enumerate(e for e in edits if isinstance(e, dict)):
        if number:
            lines.append(DiffLine("@", "…"))
        for sign, key in (("-", "old_string"), ("+", "new_string")):
            for text in _str(edit, key).split("\n"):
                if budget <= 0:
                    return lines, True
                lines.append(DiffLine(sign, text[:budget]))
                budget -= len(text) + 1
    return lines, False


def _tool_result_block(event: Event, block: dict[str, Any], tools: ToolIndex) -> ToolResultBlock:
    tool_id = _str(block, "tool_use_id")
    content = block.get("content")
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content[:MAX_PARTS]:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(_str(part, "text"))
            elif isinstance(part, dict) and part.get("type") == "image":
                images.append(_image_description(part))
            else:
                texts.append(pretty_json(part))
    elif content is not None:
        texts.append(pretty_json(content))
    parts = _clip_all([text for text in texts if text], TOOL_CAP)
    if isinstance(content, list) and len(content) > MAX_PARTS and parts:
        parts[-1] = Clipped(parts[-1].text, parts[-1].total, True)
    shown = sum(len(part.text) for part in parts)
    lines = sum(part.lines for part in parts)
    is_error = block.get("is_error") is True
    return ToolResultBlock(
        tool_use_id=tool_id,
        tool=tools.resolve(event, tool_id) if tool_id else None,
        is_error=is_error,
        parts=parts,
        images=images,
        open=is_error or (shown <= OPEN_RESULT_CHARS and lines <= OPEN_RESULT_LINES),
    )


def _clip_all(texts: list[str], cap: int) -> list[Clipped]:
    """Clip several texts to one shared budget."""
    parts: list[Clipped] = []
    budget = cap
    for text in texts:
        part = clip(text, max(budget, 0))
        budget -= len(part.text)
        if part.text or not part.truncated:
            parts.append(part)
        elif parts:
            last = parts[-1]
            parts[-1] = Clipped(last.text, last.total, True)
        else:
            parts.append(part)
    return parts


def _image_description(block: dict[str, Any]) -> str:
    source = _dict(block, "source")
    media = one_line(_str(source, "media_type"), 40) or "image"
    size = len(_str(source, "data")) * 3 // 4  # base64
    return f"{media}, {size // 1024} KB" if size else media


def _server_result_block(event: Event, block: dict[str, Any], tools: ToolIndex) -> ToolResultBlock:
    """web_search_tool_result and friends: results that arrive inside the assistant turn."""
    tool_id = _str(block, "tool_use_id")
    content = block.get("content")
    error = isinstance(content, dict) and "error" in _str(content, "type")
    return ToolResultBlock(
        tool_use_id=tool_id,
        tool=tools.resolve(event, tool_id) if tool_id else None,
        is_error=error,
        parts=[clip(pretty_json(content))],
        images=[],
        open=False,
    )


def _blocks(event: Event, content: Any, tools: ToolIndex) -> list[Block]:
    if isinstance(content, str):
        return [_text_block(content)]
    blocks: list[Block] = []
    for block in content[:MAX_BLOCKS] if isinstance(content, list) else []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            blocks.append(_text_block(_str(block, "text")))
        elif kind == "thinking":
            blocks.append(ThinkingBlock(clip(_str(block, "thinking"), DISPLAY_CAP)))
        elif kind == "redacted_thinking":
            blocks.append(ThinkingBlock(None))
        elif kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
            blocks.append(_tool_use_block(event, block, tools))
        elif kind == "tool_result":
            blocks.append(_tool_result_block(event, block, tools))
        elif kind == "image":
            blocks.append(ImageBlock(_image_description(block)))
        elif isinstance(block, dict) and _str(block, "tool_use_id"):
            blocks.append(_server_result_block(event, block, tools))
        else:
            label = one_line(_str(block, "type"), 64) if isinstance(block, dict) else "block"
            blocks.append(GenericBlock(label or "block", clip(pretty_json(block))))
    return blocks


def _message(event: Event, data: dict[str, Any], tools: ToolIndex) -> EventItem:
    role = "assistant" if data.get("type") == "assistant" else "user"
    content = _dict(data, "message").get("content")
    blocks = _blocks(event, content, tools)
    only_results = bool(blocks) and all(isinstance(b, ToolResultBlock) for b in blocks)
    label = "tool result" if only_results else role
    item = _item(event, "message", label, inside=_inside(event, data, tools), blocks=blocks)
    if isinstance(content, list) and len(content) > MAX_BLOCKS:
        item.detail["more_blocks"] = len(content) - MAX_BLOCKS
    error = _str(data, "error")  # the SDK marks failed assistant turns (auth, rate limit…)
    if error:
        item.is_error, item.text = True, clip(error, SUMMARY_CAP * 2)
    item.statuses = [
        ToolStatus(dom_id(b.tool_use_id), "error" if b.is_error else "done", event.seq)
        for b in blocks
        if isinstance(b, ToolResultBlock) and b.tool_use_id
    ]
    return item


def _init(event: Event, data: dict[str, Any], tools: ToolIndex) -> EventItem:
    session_id = _str(data, "session_id")
    first = tools.first_init_seq(session_id) if session_id else None
    resumed = first is not None and first < event.seq
    tool_names = [
        one_line(clean_text(t), 100) for t in _list(data, "tools")[:500] if isinstance(t, str)
    ]
    servers = [
        (one_line(_str(s, "name"), 80), one_line(_str(s, "status"), 40))
        for s in _list(data, "mcp_servers")[:100]
        if isinstance(s, dict)
    ]
    facts = [
        (key, one_line(_str(data, key), 200))
        for key in (
            "permissionMode",
            "apiKeySource",
            "claude_code_version",
            "output_style",
            "session_id",
        )
        if _str(data, key)
    ]
    return _item(
        event,
        "init",
        "session resumed" if resumed else "session started",
        inside=_inside(event, data, tools),
        pairs=facts,
        detail={
            "model": one_line(_str(data, "model"), 80),
            "cwd": one_line(_str(data, "cwd"), 200),
            "tools": tool_names,
            "servers": servers,
            "failed_servers": sum(1 for _, status in servers if status not in ("connected", "")),
        },
    )


def _system(event: Event, data: dict[str, Any], tools: ToolIndex) -> EventItem:
    subtype = one_line(_str(data, "subtype"), 64) or "system"
    text = ""
    if subtype == "compact_boundary":
        meta = _dict(data, "compact_metadata")
        tokens = _number(meta, "pre_tokens")
        text = "context compacted"
        if _str(meta, "trigger"):
            text += f" ({one_line(_str(meta, 'trigger'), 20)})"
        if tokens is not None:
            text += f" · {int(tokens):,} tokens before"
    return _item(
        event,
        "system",
        subtype,
        level="muted",
        text=clip(text) if text else None,
        inside=_inside(event, data, tools),
        json=clip(pretty_json(data)),
    )


def _seconds(ms: float | None) -> str:
    return f"{ms / 1000:.1f} s" if ms is not None else ""


def _result(event: Event, data: dict[str, Any], tools: ToolIndex) -> EventItem:
    subtype = one_line(_str(data, "subtype"), 64) or "result"
    is_error = data.get("is_error") is True or subtype.startswith("error")
    usage = _dict(data, "usage")
    cost = _number(data, "total_cost_usd")
    facts = [
        ("cost", f"${cost:.4f}" if cost is not None else ""),
        ("duration", _seconds(_number(data, "duration_ms"))),
        ("API time", _seconds(_number(data, "duration_api_ms"))),
        ("turns", _str(data, "num_turns")),
        ("input tokens", _tokens(usage, "input_tokens")),
        ("output tokens", _tokens(usage, "output_tokens")),
        ("cache read", _tokens(usage, "cache_read_input_tokens")),
        ("cache write", _tokens(usage, "cache_creation_input_tokens")),
    ]
    denials = _list(data, "permission_denials")
    if denials:
        facts.append(("permission denials", str(len(denials))))
    errors = [
        one_line(e if isinstance(e, str) else pretty_json(e), 300) for e in _list(data, "errors")
    ][:20]
    text = _str(data, "result")
    clipped = clip(text, DISPLAY_CAP)
    return _item(
        event,
        "result",
        subtype.replace("_", " "),
        is_error=is_error,
        level="error" if is_error else "ok",
        pairs=[(k, v) for k, v in facts if v],
        inside=_inside(event, data, tools),
        html=render_markdown(clipped.text) if text else None,
        text=clipped if text else None,
        detail={"errors": errors},
    )


def _tokens(usage: dict[str, Any], key: str) -> str:
    value = _number(usage, key)
    return f"{int(value):,}" if value is not None else ""


def _pairs(data: dict[str, Any], skip: Iterable[str] = ("type",)) -> list[tuple[str, str]]:
    """Scalar (and short list) fields as key/value facts, for small notice lines."""
    skipped = set(skip)
    pairs = []
    for key, value in list(data.items())[:20]:
        if key in skipped or value is None:
            continue
        if isinstance(value, list):
            shown = ", ".join(clean_text(str(v)) for v in value[:20] if isinstance(v, str | int))
        elif isinstance(value, dict):
            shown = ", ".join(clean_text(str(k)) for k in list(value)[:20])
        else:
            shown = clean_text(str(value))
        pairs.append((one_line(clean_text(str(key)), 40), one_line(shown, 200)))
    return pairs


def _notice(event: Event, label: str, level: str, text: str = "", **kwargs: Any) -> EventItem:
    return _item(
        event,
        "notice",
        label,
        level=level,
        text=clip(text, DISPLAY_CAP) if text else None,
        **kwargs,
    )


def _stream(event: Event, data: dict[str, Any], tools: ToolIndex) -> EventItem:
    inner = _dict(data, "event")
    label = one_line(_str(inner, "type"), 64) or "partial"
    delta = one_line(_str(_dict(inner, "delta"), "type"), 64)
    if delta:
        label = f"{label} · {delta}"
    return _item(
        event,
        "stream",
        label,
        level="muted",
        inside=_inside(event, data, tools),
        json=clip(pretty_json(data), TOOL_CAP // 4),
    )


def _tool_progress(event: Event, data: dict[str, Any], tools: ToolIndex) -> EventItem:
    name = one_line(_str(data, "tool_name"), 60) or "tool"
    seconds = _number(data, "elapsed_time_seconds")
    text = f"{name} running" + (f" · {seconds:.0f} s" if seconds is not None else "")
    return _notice(event, "tool progress", "muted", text, inside=_inside(event, data, tools))


def _agent(event: Event, data: dict[str, Any], tools: ToolIndex) -> EventItem:
    kind = data.get("type")
    match kind:
        case "assistant" | "user":
            return _message(event, data, tools)
        case "system" if data.get("subtype") == "init":
            return _init(event, data, tools)
        case "system":
            return _system(event, data, tools)
        case "result":
            return _result(event, data, tools)
        case "stream_event":
            return _stream(event, data, tools)
        case "tool_progress":
            return _tool_progress(event, data, tools)
        case "tool_use_summary":
            return _notice(
                event,
                "tool summary",
                "muted",
                _str(data, "summary"),
                inside=_inside(event, data, tools),
            )
        case "turn_complete":
            session_id = one_line(_str(data, "claude_session_id"), 80)
            return _item(
                event,
                "divider",
                "turn complete",
                level="muted",
                pairs=[("claude session", session_id)] if session_id else [],
            )
        case "ready":
            return _notice(event, "agent ready", "muted")
        case "configured":
            return _notice(event, "agent configured", "muted", pairs=_pairs(data))
        case "interrupted":
            return _notice(event, "interrupted", "warn")
        case "error":
            return _notice(
                event,
                "agent error",
                "error",
                _str(data, "message") or "(no message)",
                is_error=True,
            )
    return _generic(event)


# ---------------------------------------------------------------------------------------
# Our own events: dashboard actions (attributed) and bridge observations.


def _actor_name(event: Event) -> str:
    if event.actor_id is None:
        return "someone"
    try:
        return clean_text(event.actor.get_username())
    except ObjectDoesNotExist:  # deleted between the event's load and now
        return "a deleted user"


def _dashboard(event: Event, data: dict[str, Any]) -> EventItem:
    who = _actor_name(event)
    kind = data.get("type")
    detail: dict[str, Any] = {"actor": who}
    match kind:
        case "prompt":
            return _item(
                event,
                "action",
                f"{who} sent a prompt",
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
            return _notice(event, label, "muted")
    return _generic(event)


def _stderr(event: Event) -> EventItem:
    return _item(event, "stderr", "stderr", level="muted", text=clip(event.raw))


def _describe(event: Event, tools: ToolIndex) -> EventItem:
    if event.source == Event.Source.STDERR:
        return _stderr(event)
    data = event.data
    if data is None:
        return _generic(event)
    if event.source == Event.Source.DASHBOARD:
        return _dashboard(event, data)
    if event.source == Event.Source.BRIDGE:
        return _bridge(event, data)
    return _agent(event, data, tools)


def describe(event: Event, tools: ToolIndex) -> EventItem:
    """What the templates need to show `event`. Never raises."""
    try:
        return _describe(event, tools)
    except Exception:
        log.exception("could not describe event %s of session %s", event.seq, event.session_id)
        return _generic(event, note="This event could not be displayed normally.")


# ---------------------------------------------------------------------------------------
# Rendering.


def _render(partial: str, event: Event, tools: ToolIndex) -> str:
    item = describe(event, tools)
    try:
        return render_to_string(f"agents/timeline.html#{partial}", {"item": item})
    except Exception:
        log.exception("could not render event %s of session %s", event.seq, event.session_id)
        fallback = _generic(event, note="This event could not be displayed normally.")
        fallback.statuses = item.statuses
        return render_to_string(f"agents/timeline.html#{partial}", {"item": fallback})


def render_event(event: Event, tools: ToolIndex) -> str:
    """One event's element, for a page render (`tools` from `ToolIndex.for_session`)."""
    return _render("event", event, tools)


def render_event_oob(event: Event, tools: ToolIndex) -> str:
    """One event as htmx out-of-band swaps for the ws extension: the element appended to
    #timeline (or #stderr-log), plus the status marker of every call it answers."""
    return _render("event-oob", event, tools)


@dataclass
class RenderedTimeline:
    timeline: SafeString  # for #timeline
    stderr: SafeString  # for #stderr-log


def render_timeline(session: AgentSession, events: Iterable[Event]) -> RenderedTimeline:
    """A page's worth of events, split between the timeline and the stderr log."""
    events = list(events)
    tools = ToolIndex.for_session(session, events)
    timeline: list[str] = []
    stderr: list[str] = []
    for event in events:
        html = render_event(event, tools)
        (stderr if event.source == Event.Source.STDERR else timeline).append(html)
    # Each piece came out of an autoescaping template.
    return RenderedTimeline(mark_safe("".join(timeline)), mark_safe("".join(stderr)))
