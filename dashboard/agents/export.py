"""A session's recording, downloadable: JSON Lines (complete, machine-readable) and Markdown
(a readable transcript).

Both walk the events once and yield as they go; `downloads.py` streams them in chunks. The
JSON export is lossless: each event as parsed, or its raw text when it was not a JSON
object. The Markdown one is for people: prompts, text, tool calls and capped tool results.
Everything a sandbox (or a person) wrote is hostile: inside code fences it stays as written
(a fence shows it verbatim in any CommonMark renderer), and outside them it is made inert
(`inert.py`), so that the file is safe to open in a renderer that passes raw HTML through.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from django.core.exceptions import ObjectDoesNotExist

from dashboard.agents.inert import plain, safe_markdown
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering import ToolIndex, clean_text, one_line, pretty_json
from dashboard.awareness.attention import reason_labels

log = logging.getLogger(__name__)

# Characters of a tool result (or input) kept in the Markdown transcript.
RESULT_CAP = 2_000
INPUT_CAP = 4_000

_BACKTICKS = re.compile(r"`+")


# ---------------------------------------------------------------------------------------
# JSON Lines


def _dumps(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON escape: keep them, escaped
        text = json.dumps(value, ensure_ascii=True)
    return text


def _actor(event: Event) -> str | None:
    if event.actor_id is None:
        return None
    try:
        actor = event.actor
    except ObjectDoesNotExist:  # deleted since the event was loaded
        return None
    return clean_text(actor.get_username()) if actor is not None else None


def event_record(event: Event) -> dict[str, Any]:
    record: dict[str, Any] = {
        "seq": event.seq,
        "time": event.created_at.isoformat(),
        "source": event.source,
        "type": event.type,
        "actor": _actor(event),
    }
    data = event.data
    if data is not None:
        record["event"] = data
    else:
        record["raw"] = event.raw
    return record


def session_jsonl(session: AgentSession, events: Iterable[Event]) -> Iterator[str]:
    """One JSON object per event, in the order given (no trailing newline on each)."""
    for event in events:
        record = event_record(event)
        try:
            yield _dumps(record)
        except (ValueError, RecursionError):  # parsed, but too deep to write back: the text
            record.pop("event", None)
            yield _dumps({**record, "raw": event.raw})


# ---------------------------------------------------------------------------------------
# Markdown


def fence(text: str, info: str = "") -> str:
    """A fenced code block that `text` cannot close: one backtick longer than any run in it."""
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    ticks = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{ticks}{info}\n{body}{ticks}\n\n"


def inline_code(text: str) -> str:
    text = one_line(clean_text(text), 200)
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _capped(text: str, cap: int, seq: int) -> tuple[str, str]:
    """The text cut to `cap`, and a note saying so (empty when nothing was cut)."""
    text = clean_text(text)
    if len(text) <= cap:
        return text, ""
    note = (
        f"*(cut: {len(text) - cap:,} more characters; the full payload is event "
        f"{seq} in the JSON export)*\n\n"
    )
    return text[:cap], note


def _quote(text: str) -> str:
    text = safe_markdown(clean_text(text))
    return "".join(f"> {line}\n" if line else ">\n" for line in text.split("\n"))


def _header(session: AgentSession) -> str:
    facts = [
        (
            "Status",
            session.get_status_display()
            + (f" (exit code {session.exit_code})" if session.exit_code is not None else ""),
        ),
        ("Model", plain(session.model) or "agent default"),
        ("Cost", f"${session.total_cost_usd:.4f}"),
        ("Turns", str(session.num_turns)),
        ("Tokens", f"{session.input_tokens:,} in, {session.output_tokens:,} out"),
        (
            "Started",
            session.started_at.isoformat()
            + (f" by {plain(session.started_by.get_username())}" if session.started_by else ""),
        ),
        ("Sandbox", inline_code(session.sandbox.upstream_id)),
        ("Agent session", inline_code(session.upstream_id)),
    ]
    if session.claude_session_id:
        facts.append(("Claude session", inline_code(session.claude_session_id)))
    title = plain(session.title) or "(untitled)"
    lines = [f"# {title}\n\n"] + [f"- **{key}:** {value}\n" for key, value in facts]
    return "".join(lines) + "\n---\n\n"


def _who(event: Event) -> str:
    return plain(_actor(event) or "someone")


def _blocks(data: dict[str, Any]) -> list[Any]:
    message = data.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") == "image":
                parts.append("[image]")
            else:
                parts.append(pretty_json(part))
        return "\n".join(parts)
    return "" if content is None else pretty_json(content)


def _message_md(event: Event, data: dict[str, Any], tools: ToolIndex) -> str:
    inside = data.get("parent_tool_use_id")
    prefix = ""
    if isinstance(inside, str) and inside:
        ref = tools.get(inside)
        prefix = f" *(inside {plain(ref.name) if ref else 'a subagent'})*"
    out = []
    for block in _blocks(data):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            text, note = _capped(str(block.get("text", "")), 50_000, event.seq)
            text = safe_markdown(text)
            who = "Assistant" if data.get("type") == "assistant" else "User"
            out.append(f"**{who}:**{prefix}\n\n{text}\n\n{note}")
        elif kind == "thinking":
            out.append(
                f"*(thinking, {len(str(block.get('thinking', ''))):,} characters)*{prefix}\n\n"
            )
        elif kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
            out.append(_tool_use_md(event, block, prefix))
        elif kind == "tool_result" or isinstance(block.get("tool_use_id"), str):
            out.append(_tool_result_md(event, block, tools, prefix))
    return "".join(out)


def _tool_use_md(event: Event, block: dict[str, Any], prefix: str) -> str:
    name = str(block.get("name") or "tool")
    tool_input = block.get("input")
    fields = tool_input if isinstance(tool_input, dict) else {}
    path = fields.get("file_path") if isinstance(fields.get("file_path"), str) else ""
    where = f" {inline_code(path)}" if path else ""
    if name == "Bash" and isinstance(fields.get("command"), str):
        body, info, where = fields["command"], "bash", ""
    elif name == "Write" and path and isinstance(fields.get("content"), str):
        body, info = fields["content"], ""
    elif name in ("Edit", "MultiEdit") and path:
        edits = fields.get("edits") if name == "MultiEdit" else [fields]
        body, info = _diff_text(edits if isinstance(edits, list) else []), "diff"
    else:
        body, info, where = pretty_json(tool_input), "json", ""
    body, note = _capped(body, INPUT_CAP, event.seq)
    return f"**Tool call**{prefix} {inline_code(name)}{where}\n\n{fence(body, info)}{note}"


def _diff_text(edits: list[Any]) -> str:
    """old_string lines as `-`, new_string lines as `+`, like the timeline shows them."""
    hunks = []
    for edit in (e for e in edits if isinstance(e, dict)):
        old, new = edit.get("old_string"), edit.get("new_string")
        lines = [f"-{line}" for line in str(old or "").split("\n")]
        lines += [f"+{line}" for line in str(new or "").split("\n")]
        hunks.append("\n".join(lines))
    return "\n@@\n".join(hunks)


def _tool_result_md(event: Event, block: dict[str, Any], tools: ToolIndex, prefix: str) -> str:
    tool_id = block.get("tool_use_id")
    ref = tools.get(tool_id) if isinstance(tool_id, str) else None
    label = f" of {inline_code(ref.name)}" if ref else ""
    error = " (error)" if block.get("is_error") is True else ""
    body, note = _capped(_result_text(block.get("content")), RESULT_CAP, event.seq)
    return f"**Tool result**{label}{error}{prefix}\n\n{fence(body)}{note}"


def _result_md(data: dict[str, Any]) -> str:
    subtype = str(data.get("subtype") or "result")
    facts = [subtype.replace("_", " ")]
    if isinstance(data.get("num_turns"), int):
        facts.append(f"{data['num_turns']} turns")
    cost = data.get("total_cost_usd")
    if isinstance(cost, int | float):
        facts.append(f"${cost:.4f}")
    duration = data.get("duration_ms")
    if isinstance(duration, int | float):
        facts.append(f"{duration / 1000:.1f} s")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    if isinstance(usage.get("input_tokens"), int) and isinstance(usage.get("output_tokens"), int):
        facts.append(f"{usage['input_tokens']:,} in / {usage['output_tokens']:,} out tokens")
    errors = data.get("errors")
    errors = errors if isinstance(errors, list) else []
    lines = [f"**Result:** {' · '.join(plain(f) for f in facts)}\n\n"]
    lines += [f"- error: {plain(str(e), 500)}\n" for e in errors[:20]]
    return "".join(lines) + ("\n" if errors else "") + "---\n\n"


def _dashboard_md(event: Event, data: dict[str, Any]) -> str:
    who = _who(event)
    match data.get("type"):
        case "prompt":
            return f"### {who} sent a prompt\n\n{_quote(str(data.get('text', '')))}\n"
        case "interrupt":
            return f"*{who} interrupted.*\n\n"
        case "kill":
            return f"*{who} killed the session.*\n\n"
        case "sandbox_kill":
            return f"*{who} killed the sandbox.*\n\n"
        case "attach":
            return f"*{who} attached.*\n\n"
        case "configure":
            changes = {k: v for k, v in data.items() if k != "type"}
            return f"*{who} changed configuration:*\n\n{fence(pretty_json(changes), 'json')}"
        case "continue":
            title = plain(str(data.get("title", "")))
            return f"*{who} continued in a new session: {title}*\n\n"
        case "acknowledged":
            why = "; ".join(reason_labels(data.get("reasons")))
            return f"*{who} marked the session as handled*" + (f" ({why})" if why else "") + ".\n\n"
    return ""


def _bridge_md(data: dict[str, Any]) -> str:
    match data.get("type"):
        case "gap":
            lost = data.get("lost_bytes")
            size = f" ({lost:,} bytes)" if isinstance(lost, int) else ""
            message = plain(str(data.get("message", "")))
            return f"> **Warning:** output was lost{size}: {message}\n\n"
        case "exit":
            return f"*The process exited with code {data.get('code')}.*\n\n"
        case "lost":
            return f"> **Connection lost:** {plain(str(data.get('reason', '')))}\n\n"
    return ""


def _agent_md(event: Event, data: dict[str, Any], tools: ToolIndex) -> str:
    match data.get("type"):
        case "assistant" | "user":
            return _message_md(event, data, tools)
        case "result":
            return _result_md(data)
        case "error":
            return f"> **Agent error:** {plain(str(data.get('message', '')), 1000)}\n\n"
        case "interrupted":
            return "*Interrupted.*\n\n"
        case "system" if data.get("subtype") == "init":
            model = plain(str(data.get("model", "")), 100)
            return f"*Session started ({model}).*\n\n"
    return ""


def _event_md(event: Event, tools: ToolIndex) -> str:
    data = event.data
    if event.source == Event.Source.STDERR or data is None:
        return ""  # the log and unparseable lines are in the JSON export
    if event.source == Event.Source.DASHBOARD:
        return _dashboard_md(event, data)
    if event.source == Event.Source.BRIDGE:
        return _bridge_md(data)
    return _agent_md(event, data, tools)


class Transcript:
    """Markdown pieces for events handed in order, in as many batches as the caller likes
    (tool calls are paired with their results across batches)."""

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        self.tools = ToolIndex()

    def header(self) -> str:
        return clean_text(_header(self.session))

    def pieces(self, events: Iterable[Event]) -> Iterator[str]:
        for event in events:
            self.tools.observe(event)
            try:
                piece = _event_md(event, self.tools)
            except Exception:  # hostile data must not cut a download short
                log.exception("markdown export: event %s of session %s", event.seq, self.session.id)
                piece = f"*(event {event.seq} could not be shown; it is in the JSON export)*\n\n"
            if piece:
                yield clean_text(piece)


def iter_session_markdown(session: AgentSession, events: Iterable[Event]) -> Iterator[str]:
    """The transcript in pieces (a header, then one piece per event that shows)."""
    transcript = Transcript(session)
    yield transcript.header()
    yield from transcript.pieces(events)


def session_markdown(session: AgentSession, events: Iterable[Event]) -> str:
    return "".join(iter_session_markdown(session, events))
