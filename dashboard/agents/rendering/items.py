"""What the templates get: plain Python values (text, numbers, lists) that the partials in
`templates/agents/timeline.jinja` render with autoescaping."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

from django.utils import formats, timezone
from django.utils.safestring import SafeString

from dashboard.agents.models import Event
from dashboard.agents.rendering.base import (
    PRETTY_JSON_MAX_RAW,
    STDERR_TARGET,
    TIMELINE_TARGET,
    Clipped,
    _str,
    accent,
    clip,
    one_line,
)
from dashboard.agents.rendering.highlight import DiffRow
from dashboard.agents.rendering.templates import render
from dashboard.agents.rendering.tools import TASK_NAMES, ToolRef, ToolStatus


@dataclass
class TextBlock:
    html: SafeString  # sanitised markdown
    truncated: bool = False
    total: int = 0
    # Text past the event's work budget: shown as it is (escaped), not formatted.
    plain: Clipped | None = None
    kind: str = "text"
    # Text markdown would only cut into paragraphs (`plain_paragraphs`): written by the
    # template, escaped, instead of `html`.
    paragraphs: list[str] | None = None


@dataclass
class ThinkingBlock:
    text: Clipped | None  # None when redacted
    kind: str = "thinking"


@dataclass
class ToolUseBlock:
    """One card per tool call: its input, and its result once known (page renders; live,
    the result is swapped into the card's slot by id)."""

    ref: ToolRef
    status: ToolStatus
    view: str  # bash | write | edit | json
    server: bool = False
    description: str = ""  # Bash's own description of the command
    code: Clipped | None = None  # bash: the command; write: the content; json: the input
    code_html: SafeString | None = None  # `code` highlighted (Pygments), when it could be
    path: str = ""  # write / edit
    diff: list[DiffRow] = field(default_factory=list)
    diff_truncated: bool = False
    result: ToolResultBlock | None = None
    children: list[SafeString] = field(default_factory=list)  # a Task's subagent events
    kind: str = "tool_use"

    @property
    def is_task(self) -> bool:
        return self.ref.name in TASK_NAMES

    @property
    def open(self) -> bool:
        """Cards start collapsed to their one-line summary, except a subagent's work and
        failures."""
        return self.is_task or self.status.state == "error"


@dataclass
class ToolResultBlock:
    tool_use_id: str
    tool: ToolRef | None
    is_error: bool
    parts: list[Clipped]
    images: list[str]  # one short description per image block
    open: bool
    seq: int = 0  # the event holding the result (its "show full" link)
    session_id: str = ""
    raw_size: int = 0
    # Read's output: (line number, highlighted line) when it could be highlighted.
    numbered: list[tuple[str, SafeString]] = field(default_factory=list)
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


@dataclass(frozen=True)
class Stamp:
    """An event's time as the `time` partial shows it: machine-readable, full, and short."""

    iso: str
    title: str
    clock: str

    @cached_property
    def html(self) -> SafeString:
        """The `<time>` element, rendered once per stamp: a batch's events share one, and
        calling a macro for it cost each event about as much as the rest of its header."""
        return render("time_element", stamp=self)


NO_STAMP = Stamp("", "", "")


def stamp(moment: datetime | None) -> Stamp:
    """`moment` to the second (as the page shows it) in the current time zone, formatted
    and drawn once however many events share that second: formatting a time three ways
    per event was a sixth of the cost of rendering a flood, and, with a paced session's
    events each stored at a time of its own, 65 µs of each one's record."""
    if moment is None:
        return NO_STAMP
    return _stamp(moment.replace(microsecond=0), timezone.get_current_timezone_name())


@lru_cache(maxsize=64)
def _stamp(moment: datetime, zone: str) -> Stamp:
    # The same conversion and formats as the `date` and `time` filters would apply.
    local = timezone.localtime(moment) if timezone.is_aware(moment) else moment
    return Stamp(
        formats.date_format(local, "c"),
        formats.date_format(local, "Y-m-d H:i:s T"),
        formats.time_format(local, "H:i:s"),
    )


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
    stamp: Stamp = NO_STAMP  # `time`, formatted

    @property
    def more_blocks(self) -> int:
        """Content blocks past MAX_BLOCKS (a message's "more blocks not shown" note)."""
        return int(self.detail.get("more_blocks", 0))

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


# Read once: `Event.Source.values` builds the list (and looks the labels up) on each call.
SOURCES = frozenset(Event.Source.values)


def _item(event: Event, kind: str, label: str, **kwargs: Any) -> EventItem:
    source = event.source if event.source in SOURCES else "agent"
    return EventItem(
        seq=event.seq,
        session_id=str(event.session_id),
        source=source,
        kind=kind,
        label=label,
        time=event.created_at,
        stamp=stamp(event.created_at),
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
