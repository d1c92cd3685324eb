"""Small, defensive helpers shared by every renderer: the data is hostile, so no accessor
assumes a type, and every string shown is capped for display (the full line stays
downloadable through the `event_raw` URL)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from dashboard.agents.rendering import budget

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


# What a terminal acts on and a page cannot show. A control character other than tab and
# the line breaks (NUL, BEL, backspace, ESC…, DEL) is not allowed in HTML's text; it is
# shown as its escape (`\x07`), which every font can draw (Unicode's control pictures, ␇,
# are missing from common monospace fonts). Escape sequences (colours, cursor moves, a
# window's title) are dropped whole: their ESC alone would leave "[31m" in the text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?)")
_SHOWN = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F] if code not in (9, 10, 13)}


def clean_text(value: str) -> str:
    """`value` as a page can show it: control characters made visible (escape sequences
    dropped), and lone surrogates (valid in JSON escapes, invalid in UTF-8), which would
    make the response or the WebSocket frame fail to encode, replaced. The raw line keeps
    everything."""
    if _CONTROL.search(value) is not None:
        value = _ESCAPE_SEQUENCE.sub("", value).translate(_SHOWN)
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
    """At most `cap` characters of `text`, and no more than the event's budget has left."""
    shown = budget.current().take_shown(min(len(text), cap))
    if len(text) <= shown:
        return Clipped(clean_text(text), len(text), False)
    return Clipped(clean_text(text[:shown]), len(text), True)
