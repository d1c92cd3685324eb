"""Tool calls and their results as blocks of the cards: each tool's input shown its own way
(Bash and Write highlighted, Edit and MultiEdit as unified diffs, anything else as JSON),
results capped to one shared budget, Read's numbered output highlighted by file type."""

from __future__ import annotations

import re
from typing import Any

from django.utils.safestring import SafeString
from pygments.lexer import Lexer

from dashboard.agents.models import Event
from dashboard.agents.rendering import highlight
from dashboard.agents.rendering.base import (
    MAX_PARTS,
    OPEN_RESULT_CHARS,
    OPEN_RESULT_LINES,
    TOOL_CAP,
    Clipped,
    _dict,
    _list,
    _str,
    clip,
    one_line,
    pretty_json,
)
from dashboard.agents.rendering.highlight import DiffRow
from dashboard.agents.rendering.items import ToolResultBlock, ToolUseBlock
from dashboard.agents.rendering.tools import ToolIndex, ToolRef, _tool_summary


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
        use.code_html = highlight.block(use.code.text, highlight.lexer_named("bash"))
    elif name == "Write" and "content" in tool_input:
        use.view, use.path = "write", _str(tool_input, "file_path")
        use.code = clip(_str(tool_input, "content"))
        use.code_html = highlight.block(use.code.text, highlight.lexer_for_path(use.path))
    elif name in ("Edit", "MultiEdit") and _str(tool_input, "file_path"):
        use.view, use.path = "edit", _str(tool_input, "file_path")
        edits = _list(tool_input, "edits") if name == "MultiEdit" else [tool_input]
        use.diff, use.diff_truncated = _diff(edits, highlight.lexer_for_path(use.path))
    elif not _said_by_summary(tool_input, ref.summary):
        use.code = clip(pretty_json(tool_input))
        use.code_html = highlight.block(use.code.text, highlight.lexer_named("json"))
    return use


def _said_by_summary(tool_input: dict[str, Any], summary: str) -> bool:
    """`{"file_path": "/a/b.py"}` says nothing the header's summary does not: skip the body."""
    values = list(tool_input.values())
    return len(values) == 1 and isinstance(values[0], str) and values[0].strip() == summary


def _diff(edits: list[Any], lexer: Lexer | None) -> tuple[list[DiffRow], bool]:
    """Each edit as a hunk of a unified diff, all edits sharing TOOL_CAP characters of each
    side (drawn from the event's budget like any clip)."""
    rows: list[DiffRow] = []
    cut = False
    for edit in (e for e in edits if isinstance(e, dict)):
        old, new = clip(_str(edit, "old_string")), clip(_str(edit, "new_string"))
        hunk, hunk_cut = highlight.diff(old.text, new.text, lexer)
        rows += hunk
        cut = cut or hunk_cut or old.truncated or new.truncated
        if old.truncated or new.truncated:
            break
    return rows, cut


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
    tool = tools.resolve(event, tool_id) if tool_id else None
    result = ToolResultBlock(
        tool_use_id=tool_id,
        tool=tool,
        is_error=is_error,
        parts=parts,
        images=images,
        open=is_error or (shown <= OPEN_RESULT_CHARS and lines <= OPEN_RESULT_LINES),
        seq=event.seq,
        session_id=str(event.session_id),
        raw_size=len(event.raw.encode("utf-8", "replace")),
    )
    if tool is not None and tool.name == "Read" and len(parts) == 1 and not is_error:
        result.numbered = _numbered(parts[0].text, highlight.lexer_for_path(tool.summary))
    return result


# Read's output is `cat -n` style: a right-aligned number, then a tab or an arrow.
_NUMBERED_LINE = re.compile(r" *(\d{1,9})(?:\t|\u2192)(.*)")


def _numbered(text: str, lexer: Lexer | None) -> list[tuple[str, SafeString]]:
    """Read's lines as (number, highlighted code), or [] when they are not all numbered
    or cannot be highlighted (then the text is shown as it is)."""
    matches = [_NUMBERED_LINE.fullmatch(line) for line in text.splitlines()]
    if lexer is None or not matches or not all(matches):
        return []
    code = [match.group(2) for match in matches if match]
    highlighted = highlight.lines("\n".join(code), lexer)
    if highlighted is None or len(highlighted) != len(code):
        return []
    return [
        (match.group(1), line) for match, line in zip(matches, highlighted, strict=True) if match
    ]


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
