"""What of an event is worth finding: the text a person would search for.

Prompts, what the agent said (text blocks), tool inputs (the command, the path, the
content…) and outputs, final results and errors. Everything is capped per event, and lines
too large to be worth parsing are indexed as their first characters only: indexing runs as
events are recorded and must stay cheap whatever the agent prints.
"""

from __future__ import annotations

import json
from typing import Any

from dashboard.agents.masking import mask_text
from dashboard.agents.rendering.base import clean_text

MAX_TEXT = 20_000  # characters indexed per event
PARSE_MAX = 1_000_000  # longer raw lines are not parsed for indexing
# Highlight markers in snippets: never part of indexed text.
MARKERS = str.maketrans({"\x01": " ", "\x02": " ", "\x00": " "})
# The kinds of event `extract` may find something in (besides an agent's line that is not
# JSON and too long to parse): what looks for events left unindexed need read no other.
FINDABLE = {"dashboard": ("prompt",), "agent": ("assistant", "user", "result", "error")}


def _strings(value: Any, out: list[str], budget: list[int], depth: int = 0) -> None:
    """Every string inside a tool input or result, depth first, within the budget."""
    if budget[0] <= 0 or depth > 20:
        return
    if isinstance(value, str):
        out.append(value[: budget[0]])
        budget[0] -= len(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "type":  # a block's kind ("text", "image"), not its content
                _strings(item, out, budget, depth + 1)
    elif isinstance(value, list):
        for item in value[:200]:
            _strings(item, out, budget, depth + 1)


def _blocks(data: dict[str, Any]) -> tuple[str, list[str]]:
    message = data.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return "assistant" if data.get("type") == "assistant" else "prompt", [content]
    texts: list[str] = []
    budget = [MAX_TEXT]
    kinds: set[str] = set()
    for block in content[:200] if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"][: budget[0]])
            budget[0] -= len(block["text"])
            kinds.add("assistant")
        elif kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
            if isinstance(block.get("name"), str):
                texts.append(block["name"])
            _strings(block.get("input"), texts, budget)
            kinds.add("tool")
        elif "tool_use_id" in block:
            _strings(block.get("content"), texts, budget)
            kinds.add("tool")
    kind = "assistant" if "assistant" in kinds else "tool"
    return kind, texts


def extract(
    source: str, kind: str, raw: str, data: dict[str, Any] | None = None
) -> tuple[str, str] | None:
    """(kind of entry, text to index) for one stored event, or None when nothing in it is
    worth finding. `data` is the parsed line when the caller has it (the recorder does:
    `Event.data` parses once for indexing and rendering alike)."""
    if source not in ("agent", "dashboard"):
        return None
    if data is None:
        if len(raw) > PARSE_MAX:
            if source != "agent":
                return None
            return "tool", clean_text(raw[:MAX_TEXT].translate(MARKERS))
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(parsed, dict):
            return None
        data = parsed
    texts: list[str]
    if source == "dashboard":
        if kind != "prompt" or not isinstance(data.get("text"), str):
            return None
        entry, texts = "prompt", [data["text"]]
    elif kind in ("assistant", "user"):
        entry, texts = _blocks(data)
    elif kind == "result" and isinstance(data.get("result"), str):
        entry, texts = "result", [data["result"]]
    elif kind == "error" and isinstance(data.get("message"), str):
        entry, texts = "error", [data["message"]]
    else:
        return None
    text = "\n".join(t for t in texts if t)[:MAX_TEXT].translate(MARKERS).strip()
    # (Stored lines are masked already; masking again costs little and keeps it so.)
    return (entry, mask_text(clean_text(text))) if text else None
