"""Agent events: what the in-sandbox wrapper prints on stdout (Claude Agent SDK messages
forwarded as they are, and the wrapper's own lines)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from django.utils.safestring import SafeString, mark_safe

from dashboard.agents import markdown
from dashboard.agents.markdown import render_markdown
from dashboard.agents.models import Event
from dashboard.agents.rendering import budget
from dashboard.agents.rendering.base import (
    DISPLAY_CAP,
    MAX_BLOCKS,
    SUMMARY_CAP,
    TOOL_CAP,
    Clipped,
    _dict,
    _list,
    _number,
    _str,
    clean_text,
    clip,
    dom_id,
    one_line,
    pretty_json,
)
from dashboard.agents.rendering.calls import (
    _image_description,
    _server_result_block,
    _tool_result_block,
    _tool_use_block,
)
from dashboard.agents.rendering.items import (
    Block,
    EventItem,
    GenericBlock,
    ImageBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    _generic,
    _item,
)
from dashboard.agents.rendering.tools import ToolIndex, ToolRef, ToolStatus


def _inside(event: Event, data: dict[str, Any], tools: ToolIndex) -> ToolRef | None:
    parent = _str(data, "parent_tool_use_id")
    if not parent:
        return None
    return tools.resolve(event, parent) or ToolRef(parent, "Task", "", None)


def _markdown(clipped: Clipped) -> SafeString | None:
    """Sanitised markdown for `clipped`, or None when formatting it would overrun the
    event's (or the page's) work budget: the caller shows it as plain text then."""
    if not budget.current().spend(markdown.work(clipped.text)):
        return None
    return render_markdown(clipped.text)


# Text that markdown would only cut into paragraphs: no character that starts inline syntax
# or an entity, no whitespace but spaces and newlines, no line indented or ending in a space
# (code blocks, hard breaks), and every line starting with a letter (so none opens a list,
# heading, quote, table, rule or setext underline). Plain prose, as in many replies, is.
# One character class, which the regex engine scans fast (alternatives with line anchors
# cost it four times as long); spaces at a line's edges are looked for with `in`. Every
# whitespace character but the space and the newline lies below U+3001.
_ODD_SPACES = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in " \n")
_NOT_PLAIN = re.compile("[" + re.escape("\\`*_[]!<>&~|\x7f" + _ODD_SPACES) + "\x00-\x09\x0b-\x1f]")
_LINE_START = re.compile(r"^(?![^\W\d_])[^\n]", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")


def plain_paragraphs(text: str) -> list[str] | None:
    """The paragraphs `text` is made of when markdown would give it no other structure,
    else None. The template then writes them escaped, with none of markdown-it's and the
    sanitiser's work (most of what rendering an agent's message cost)."""
    # Spaces ending the whole text are no hard break: markdown drops them.
    text = text.rstrip(" \n")
    if not text or _NOT_PLAIN.search(text) or text.startswith(" ") or "\n " in text:
        return None
    if " \n" in text or _LINE_START.search(text):
        return None
    return _PARAGRAPH_BREAK.split(text.lstrip("\n"))


def _text_block(text: str) -> TextBlock:
    clipped = clip(text, DISPLAY_CAP)
    paragraphs = plain_paragraphs(clipped.text)
    if paragraphs is not None:
        return TextBlock(mark_safe(""), clipped.truncated, clipped.total, paragraphs=paragraphs)
    html = _markdown(clipped)
    if html is None:
        return TextBlock(mark_safe(""), clipped.truncated, clipped.total, plain=clipped)
    return TextBlock(html, clipped.truncated, clipped.total)


def _blocks(event: Event, content: Any, tools: ToolIndex) -> list[Block]:
    if isinstance(content, str):
        return [_text_block(content)]
    blocks: list[Block] = []
    for block in content[:MAX_BLOCKS] if isinstance(content, list) else []:
        if budget.current().exhausted:
            break
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
    if isinstance(content, list) and len(content) > len(blocks):
        item.detail["more_blocks"] = len(content) - len(blocks)
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
        one_line(clean_text(e) if isinstance(e, str) else pretty_json(e), 300)
        for e in _list(data, "errors")
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
        html=_markdown(clipped) if text else None,
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
