"""The timeline: how every recorded event looks, and that nothing from a sandbox gets out."""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from dashboard.agents import rendering
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.recording import storable
from dashboard.agents.rendering import (
    TOOL_CAP,
    ToolIndex,
    dom_id,
    render_event,
    render_event_oob,
    render_timeline,
)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "transcript.jsonl"
CLAUDE_SESSION = "5f0c1a2e-8d7b-4c3a-9e21-0b6f4d8a7c10"


# ---------------------------------------------------------------------------------------
# Building sessions and events through the ORM.


def make_session(**fields: Any) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=f"sb-{uuid.uuid4().hex[:10]}")
    fields.setdefault("title", "Add signup validation")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="agent-1", **fields)


def add_event(
    session: AgentSession, source: str, payload: dict[str, Any] | str, actor: User | None = None
) -> Event:
    """Store one event the way the recorder does: next seq, type/subtype from the JSON."""
    raw = storable(payload) if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    data = data if isinstance(data, dict) else {}
    kind, subtype = data.get("type"), data.get("subtype")
    seq = session.next_seq
    session.next_seq += 1
    session.save(update_fields=["next_seq"])
    return Event.objects.create(
        session=session,
        seq=seq,
        source=source,
        type="stderr"
        if source == "stderr"
        else (storable(kind[:64]) if isinstance(kind, str) else ""),
        subtype=storable(subtype[:64]) if isinstance(subtype, str) else "",
        raw=raw,
        actor=actor,
    )


def load_transcript(session: AgentSession) -> list[Event]:
    """The fixture recording, stored as events of `session` (people created as needed)."""
    events = []
    for line in FIXTURE.read_text().splitlines():
        record = json.loads(line)
        actor = None
        if record.get("actor"):
            actor, _ = User.objects.get_or_create(username=record["actor"])
        events.append(add_event(session, record["source"], record["raw"], actor))
    return events


def render_all(session: AgentSession, events: list[Event]) -> dict[int, str]:
    tools = ToolIndex.for_session(session, events)
    return {event.seq: render_event(event, tools) for event in events}


# ---------------------------------------------------------------------------------------
# Walking the output HTML.

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
FORBIDDEN_TAGS = {
    "script",
    "iframe",
    "svg",
    "math",
    "object",
    "embed",
    "style",
    "frame",
    "frameset",
    "base",
    "link",
    "meta",
    "form",
    "img",
    "input",
    "button",
    "textarea",
    "select",
    "video",
    "audio",
}
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "xlink:href", "data", "poster"}
BAD_SCHEMES = ("javascript:", "data:", "vbscript:")


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    in_markdown: bool

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


@dataclass
class Page(HTMLParser):
    elements: list[Element] = field(default_factory=list)
    stack: list[tuple[str, set[str]]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        in_markdown = any("md" in classes for _, classes in self.stack)
        self.elements.append(Element(tag, values, in_markdown))
        if tag not in VOID:
            self.stack.append((tag, set(values.get("class", "").split())))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        in_markdown = any("md" in classes for _, classes in self.stack)
        self.elements.append(Element(tag, values, in_markdown))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [
            e
            for e in self.elements
            if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
        ]


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


def normalised_url(value: str) -> str:
    """What a browser would act on: entities are already decoded by the parser; browsers
    also ignore ASCII whitespace and control characters inside a scheme."""
    return "".join(ch for ch in value if ord(ch) > 0x20 and ch != "\x7f").lower()


def assert_safe(html: str) -> Page:
    page = parse(html)
    for element in page.elements:
        assert element.tag not in FORBIDDEN_TAGS, f"<{element.tag}> in output: {html[:2000]}"
        for name, value in element.attrs.items():
            assert not name.startswith("on"), f"{name} on <{element.tag}>"
            assert name != "style", f"inline style on <{element.tag}>"
            assert name != "srcdoc"
            if name in URL_ATTRIBUTES:
                assert not normalised_url(value).startswith(BAD_SCHEMES), f"{name}={value!r}"
        if element.tag == "a" and element.in_markdown:
            rel = set(element.attrs.get("rel", "").split())
            assert {"noopener", "noreferrer", "nofollow"} <= rel, element.attrs
    # Every id we emit is one of ours, safe in CSS selectors.
    for element in page.elements:
        if "id" in element.attrs:
            assert re.fullmatch(r"[A-Za-z0-9_-]+", element.attrs["id"]), element.attrs["id"]
    return page


def root(html: str) -> Element:
    page = parse(html)
    return page.elements[0]


# ---------------------------------------------------------------------------------------
# Every event type.

ALICE = "alice"

EVENTS: list[tuple[str, str, Any, str, list[str]]] = [
    # (id, source, payload, css class expected on the root, texts expected in the output)
    ("ready", "agent", {"type": "ready"}, "ev-notice", ["agent ready"]),
    (
        "configured",
        "agent",
        {"type": "configured", "model": "claude-opus-4-1", "maxTurns": 5},
        "lvl-muted",
        ["agent configured", "claude-opus-4-1", "maxTurns"],
    ),
    (
        "turn_complete",
        "agent",
        {"type": "turn_complete", "claude_session_id": CLAUDE_SESSION},
        "ev-divider",
        ["turn complete", CLAUDE_SESSION],
    ),
    ("interrupted", "agent", {"type": "interrupted"}, "lvl-warn", ["interrupted"]),
    (
        "error",
        "agent",
        {"type": "error", "message": "ANTHROPIC_API_KEY is not set"},
        "is-error",
        ["agent error", "ANTHROPIC_API_KEY is not set"],
    ),
    (
        "init",
        "agent",
        {
            "type": "system",
            "subtype": "init",
            "session_id": CLAUDE_SESSION,
            "model": "claude-sonnet-4-20250514",
            "cwd": "/workspace",
            "tools": ["Bash", "Read", "Write"],
            "mcp_servers": [{"name": "github", "status": "connected"}],
            "permissionMode": "bypassPermissions",
            "apiKeySource": "ANTHROPIC_API_KEY",
        },
        "ev-init",
        [
            "session started",
            "claude-sonnet-4-20250514",
            "/workspace",
            "3 tools",
            "1 MCP server",
            "github",
            "bypassPermissions",
        ],
    ),
    (
        "compact_boundary",
        "agent",
        {
            "type": "system",
            "subtype": "compact_boundary",
            "compact_metadata": {"trigger": "auto", "pre_tokens": 155021},
        },
        "ev-system",
        ["compact_boundary", "context compacted (auto)", "155,021 tokens before"],
    ),
    (
        "other_system",
        "agent",
        {"type": "system", "subtype": "hook_response", "stdout": "formatted"},
        "ev-system",
        ["hook_response", "formatted"],
    ),
    (
        "result_success",
        "agent",
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "duration_ms": 12345,
            "duration_api_ms": 10000,
            "num_turns": 7,
            "result": "All **done**.",
            "total_cost_usd": 0.12345,
            "usage": {
                "input_tokens": 1200,
                "output_tokens": 3400,
                "cache_read_input_tokens": 50000,
                "cache_creation_input_tokens": 2000,
            },
            "permission_denials": [],
        },
        "lvl-ok",
        [
            "success",
            "$0.1235",
            "12.3 s",
            "10.0 s",
            "7",
            "1,200",
            "3,400",
            "50,000",
            "2,000",
            "<strong>done</strong>",
        ],
    ),
    (
        "result_error",
        "agent",
        {
            "type": "result",
            "subtype": "error_max_turns",
            "is_error": True,
            "num_turns": 50,
            "total_cost_usd": 2,
            "usage": {"input_tokens": 1, "output_tokens": 2},
            "permission_denials": [{"tool_name": "Bash"}],
            "errors": ["Reached maximum number of turns (50)"],
        },
        "is-error",
        ["error max turns", "permission denials", "Reached maximum number of turns (50)"],
    ),
    (
        "stream_event",
        "agent",
        {
            "type": "stream_event",
            "event": {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
            "parent_tool_use_id": None,
        },
        "ev-stream",
        ["content_block_delta · text_delta"],
    ),
    (
        "tool_progress",
        "agent",
        {"type": "tool_progress", "tool_name": "Bash", "elapsed_time_seconds": 12.4},
        "ev-notice",
        ["Bash running · 12 s"],
    ),
    (
        "tool_use_summary",
        "agent",
        {"type": "tool_use_summary", "summary": "Ran the tests: 1 failure"},
        "ev-notice",
        ["Ran the tests: 1 failure"],
    ),
    ("stderr", "stderr", "[wrapper] starting up", "ev-stderr", ["[wrapper] starting up"]),
    (
        "prompt",
        "dashboard",
        {"type": "prompt", "text": "Fix the failing test"},
        "ev-action",
        ["alice sent a prompt", "Fix the failing test"],
    ),
    ("interrupt", "dashboard", {"type": "interrupt"}, "ev-action", ["alice interrupted"]),
    (
        "kill",
        "dashboard",
        {"type": "kill", "signal": 9},
        "ev-action",
        ["alice killed the session (signal 9)"],
    ),
    (
        "configure",
        "dashboard",
        {"type": "configure", "model": "claude-opus-4-1", "maxTurns": 10, "allowedTools": ["Bash"]},
        "ev-action",
        ["alice changed configuration", "claude-opus-4-1", "maxTurns", "10", "Bash"],
    ),
    ("attach", "dashboard", {"type": "attach"}, "ev-action", ["alice attached"]),
    (
        "continue",
        "dashboard",
        {"type": "continue", "session": "2d1b7c9e-4f3a-4e8b-9a0c-5e6d7f8a9b01", "title": "Next"},
        "ev-action",
        [
            "alice continued in a new session",
            "/sessions/2d1b7c9e-4f3a-4e8b-9a0c-5e6d7f8a9b01/",
            "Next",
        ],
    ),
    ("sandbox_kill", "dashboard", {"type": "sandbox_kill"}, "ev-action", ["killed the sandbox"]),
    (
        "gap",
        "bridge",
        {"type": "gap", "message": "output evicted before it was read", "lost_bytes": 18211},
        "lvl-warn",
        ["output lost", "output evicted before it was read", "18,211 bytes"],
    ),
    ("exit_ok", "bridge", {"type": "exit", "code": 0}, "lvl-ok", ["exited with code 0"]),
    ("exit_bad", "bridge", {"type": "exit", "code": 137}, "is-error", ["exited with code 137"]),
    (
        "lost",
        "bridge",
        {"type": "lost", "reason": "sandbox deleted"},
        "is-error",
        ["connection to the sandbox lost", "sandbox deleted"],
    ),
    (
        "reconnected",
        "bridge",
        {"type": "reconnected", "attempts": 3},
        "lvl-muted",
        ["reconnected after 3 attempts"],
    ),
    (
        "reconnected_lagging",
        "bridge",
        {"type": "reconnected", "attempts": 1, "reason": "lagging"},
        "lvl-muted",
        ["reconnected: reading had fallen behind the sandbox&#39;s output"],
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("source", "payload", "css", "texts"),
    [case[1:] for case in EVENTS],
    ids=[case[0] for case in EVENTS],
)
def test_it_renders_every_event_type(source: str, payload: Any, css: str, texts: list[str]) -> None:
    session = make_session()
    actor = User.objects.create_user(ALICE) if source == "dashboard" else None
    event = add_event(session, source, payload, actor)
    html = render_event(event, ToolIndex())
    element = root(html)
    assert element.tag == "article"
    assert element.attrs["id"] == f"event-{event.seq}"
    assert element.attrs["data-seq"] == str(event.seq)
    assert css in element.classes
    for text in texts:
        assert text in html, f"{text!r} not in {html}"
    page = assert_safe(html)
    times = page.find("time")
    assert times and times[0].attrs["datetime"].startswith(str(event.created_at.year))


def _assistant(content: list[dict[str, Any]], parent: str | None = None) -> dict[str, Any]:
    return {
        "type": "assistant",
        "message": {"id": "msg_1", "model": "claude-sonnet-4", "content": content, "usage": {}},
        "parent_tool_use_id": parent,
        "session_id": CLAUDE_SESSION,
    }


def _user(content: Any, parent: str | None = None) -> dict[str, Any]:
    return {
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": parent,
    }


def _tool_use(tool_id: str, name: str, tool_input: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}


def _result(tool_id: str, content: Any, is_error: bool = False) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": content, "is_error": is_error}


@pytest.mark.django_db
def test_it_renders_assistant_text_as_sanitised_markdown() -> None:
    session = make_session()
    event = add_event(
        session,
        "agent",
        _assistant(
            [
                {
                    "type": "text",
                    "text": "# Plan\n\n- **bold** and `code`\n\n"
                    "| a | b |\n|---|---|\n| 1 | ~~2~~ |",
                }
            ]
        ),
    )
    page = assert_safe(render_event(event, ToolIndex()))
    md = page.find(cls="md")
    assert md, "markdown container"
    tags = {e.tag for e in page.elements}
    assert {"h1", "strong", "code", "table", "td", "s", "ul", "li"} <= tags


@pytest.mark.django_db
def test_it_collapses_thinking_and_marks_redacted_thinking() -> None:
    session = make_session()
    event = add_event(
        session,
        "agent",
        _assistant(
            [
                {
                    "type": "thinking",
                    "thinking": "Let me consider <b>this</b>.",
                    "signature": "sig",
                },
                {"type": "redacted_thinking", "data": "opaque"},
            ]
        ),
    )
    html = render_event(event, ToolIndex())
    page = assert_safe(html)
    thinking = page.find("details", "blk-thinking")
    assert len(thinking) == 1 and "open" not in thinking[0].attrs
    assert "Let me consider &lt;b&gt;this&lt;/b&gt;." in html
    assert "thinking (redacted)" in html
    assert "opaque" not in html and "sig" not in html.replace("signal", "")


@pytest.mark.django_db
def test_it_shows_bash_write_edit_multiedit_and_other_tools_their_own_way() -> None:
    session = make_session()
    event = add_event(
        session,
        "agent",
        _assistant(
            [
                _tool_use(
                    "toolu_bash", "Bash", {"command": "pytest -q && echo ok", "description": "Test"}
                ),
                _tool_use(
                    "toolu_write", "Write", {"file_path": "/w/a.py", "content": "print('hi')\n"}
                ),
                _tool_use(
                    "toolu_edit",
                    "Edit",
                    {"file_path": "/w/b.py", "old_string": "x = 1\ny = 2", "new_string": "x = 3"},
                ),
                _tool_use(
                    "toolu_multi",
                    "MultiEdit",
                    {
                        "file_path": "/w/c.py",
                        "edits": [
                            {"old_string": "a", "new_string": "b"},
                            {"old_string": "c", "new_string": "d"},
                        ],
                    },
                ),
                _tool_use("toolu_grep", "Grep", {"pattern": "def main", "path": "src"}),
            ]
        ),
    )
    html = render_event(event, ToolIndex())
    page = assert_safe(html)
    shown = "".join(page.text)
    assert page.find("pre", "code-bash") and "pytest -q && echo ok" in shown
    assert "Test" in html
    assert page.find("pre", "code-write") and "/w/a.py" in html and "print('hi')" in shown
    deleted = page.find("tr", "diff-del")
    added = page.find("tr", "diff-add")
    assert len(deleted) == 2 + 2 and len(added) == 1 + 2
    assert "-x = 1" in shown and "-y = 2" in shown and "+x = 3" in shown
    assert len(page.find("tr", "diff-hunk")) == 3, "each edit is a hunk"
    assert page.find("pre", "code-json") and '"pattern": "def main"' in shown
    names = "".join(page.text)
    for name in ("Bash", "Write", "Edit", "MultiEdit", "Grep"):
        assert name in names
    statuses = page.find("span", "toolstatus")
    assert len(statuses) == 5
    assert all("toolstatus-running" in s.classes for s in statuses)
    assert {s.attrs["id"] for s in statuses} == {
        "toolstatus-toolu_bash",
        "toolstatus-toolu_write",
        "toolstatus-toolu_edit",
        "toolstatus-toolu_multi",
        "toolstatus-toolu_grep",
    }


@pytest.mark.django_db
def test_it_pairs_a_tool_result_with_its_call() -> None:
    session = make_session()
    call = add_event(
        session, "agent", _assistant([_tool_use("toolu_1", "Bash", {"command": "ls"})])
    )
    answer = add_event(session, "agent", _user([_result("toolu_1", "a.py\nb.py")]))
    tools = ToolIndex.for_session(session, [call, answer])
    call_html, answer_html = render_event(call, tools), render_event(answer, tools)

    # The result is drawn in its call's card; its own place keeps only a hidden mark.
    mark = root(answer_html)
    assert mark.tag == "span" and "hidden" in mark.attrs
    assert mark.attrs["data-seq"] == str(answer.seq)
    assert mark.attrs["data-at"] == "toolcall-toolu_1"
    call_page = assert_safe(call_html)
    card = call_page.find("details", "blk-tool")[0]
    assert card.attrs["id"] == "toolcall-toolu_1"
    slot = call_page.find("div", "tool-result-slot")[0]
    assert slot.attrs["id"] == "toolresult-toolu_1"
    assert "a.py\nb.py" in "".join(call_page.text)
    status = call_page.find("span", "toolstatus")[0]
    assert "toolstatus-done" in status.classes
    assert f'href="#event-{answer.seq}"' in call_html


@pytest.mark.django_db
def test_it_marks_tool_errors_and_renders_result_blocks() -> None:
    session = make_session()
    call = add_event(
        session, "agent", _assistant([_tool_use("toolu_r", "Read", {"file_path": "/x"})])
    )
    answer = add_event(
        session,
        "agent",
        _user(
            [
                _result(
                    "toolu_r",
                    [
                        {"type": "text", "text": "line one"},
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": "AAAA" * 1000,
                            },
                        },
                    ],
                    is_error=True,
                ),
            ]
        ),
    )
    tools = ToolIndex.for_session(session, [call, answer])
    html = render_event(call, tools)
    page = assert_safe(html)
    assert "open" in page.find("details", "blk-tool")[0].attrs, "a failed call shows itself"
    result = page.find("div", "blk-result")[0]
    assert "is-error" in result.classes
    assert "line one" in html and "[image: image/png, 2 KB]" in html
    assert "AAAA" not in html
    assert "toolstatus-error" in html


@pytest.mark.django_db
def test_it_renders_server_tools_user_text_images_and_unknown_blocks() -> None:
    session = make_session()
    event = add_event(
        session,
        "agent",
        _assistant(
            [
                {
                    "type": "server_tool_use",
                    "id": "srvtoolu_1",
                    "name": "web_search",
                    "input": {"query": "rfc 5321"},
                },
                {
                    "type": "web_search_tool_result",
                    "tool_use_id": "srvtoolu_1",
                    "content": [
                        {"type": "web_search_result", "title": "RFC", "url": "https://x.example"}
                    ],
                },
                {"type": "citations_delta_v9", "payload": {"x": 1}},
            ]
        ),
    )
    user = add_event(
        session,
        "agent",
        _user(
            [
                {"type": "text", "text": "plain *user* text"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/jpeg", "data": ""},
                },
            ]
        ),
    )
    tools = ToolIndex.for_session(session, [event, user])
    html = render_event(event, tools)
    page = assert_safe(html)
    assert "server" in "".join(page.text) and "web_search" in html and "rfc 5321" in html
    assert "result of" in html and "https://x.example" in html
    generic = page.find("details", "blk-generic")
    assert generic and "citations_delta_v9" in html
    user_html = render_event(user, tools)
    assert "<em>user</em>" in user_html and "[image: image/jpeg]" in user_html


@pytest.mark.django_db
def test_it_marks_subagent_messages_as_inside_their_task() -> None:
    session = make_session()
    task = add_event(
        session,
        "agent",
        _assistant(
            [
                _tool_use(
                    "toolu_task",
                    "Task",
                    {"description": "Survey validators", "prompt": "List them"},
                )
            ]
        ),
    )
    inner = add_event(
        session, "agent", _assistant([{"type": "text", "text": "inside"}], parent="toolu_task")
    )
    # On the same page, the subagent's messages are drawn inside the Task's card.
    tools = ToolIndex.for_session(session, [task, inner])
    assert root(render_event(inner, tools)).attrs["data-at"] == "toolcall-toolu_task"
    task_page = parse(render_event(task, tools))
    children = task_page.find("div", "tool-children")[0]
    assert children.attrs["id"] == "toolchildren-toolu_task"
    assert [e.attrs["id"] for e in task_page.find("article")][1:] == [f"event-{inner.seq}"]
    # On a page that starts after the Task, they say where they belong.
    fresh = Event.objects.get(pk=inner.pk)
    html = render_event(fresh, ToolIndex.for_session(session, [fresh]))
    element = root(html)
    assert "is-subagent" in element.classes
    assert "inside Task · Survey validators" in html
    assert f'href="#event-{task.seq}"' in html


@pytest.mark.django_db
def test_it_labels_a_second_init_with_the_same_session_as_a_resume() -> None:
    session = make_session()
    init = {"type": "system", "subtype": "init", "session_id": CLAUDE_SESSION, "tools": []}
    first, second = add_event(session, "agent", init), add_event(session, "agent", init)
    tools = ToolIndex.for_session(session, [first, second])
    assert "session started" in render_event(first, tools)
    assert "session resumed" in render_event(second, tools)


# ---------------------------------------------------------------------------------------
# Unknown and malformed events.


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("source", "raw", "label"),
    [
        (
            "agent",
            '{"type": "rate_limit_event", "rate_limit": {"status": "<b>ok</b>"}}',
            "rate_limit_event",
        ),
        ("agent", '{"no_type": true}', "(no type)"),
        ("agent", '{"type": 42}', "42"),
        ("agent", "Traceback: <script>alert(1)</script> not JSON {", "malformed line"),
        ("agent", "[1, 2, 3]", "malformed line"),
        ("agent", '"just a string"', "malformed line"),
        ("agent", "", "malformed line"),
        ("dashboard", '{"type": "teleport"}', "teleport"),
        ("bridge", '{"type": "solar_flare", "x": 1}', "solar_flare"),
        ("bridge", "not json", "event"),
    ],
)
def test_it_renders_unknown_and_malformed_events_as_escaped_collapsed_cards(
    source: str, raw: str, label: str
) -> None:
    session = make_session()
    event = add_event(session, source, raw)
    html = render_event(event, ToolIndex())
    page = assert_safe(html)
    assert "ev-generic" in root(html).classes
    details = page.find("details", "json-card")
    assert len(details) == 1 and "open" not in details[0].attrs
    assert label in "".join(page.text)
    assert "<b>" not in html
    if "<script>" in raw:
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.django_db
def test_it_falls_back_to_the_generic_card_when_describing_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session()
    event = add_event(session, "agent", {"type": "result", "subtype": "success"})

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(rendering.agent, "_result", broken)
    with caplog.at_level(logging.ERROR, logger="dashboard.agents.rendering"):
        html = render_event(event, ToolIndex())
    assert "ev-generic" in root(html).classes
    assert "could not be displayed normally" in html
    assert "could not describe event" in caplog.text


@pytest.mark.django_db
def test_it_survives_wrong_types_everywhere() -> None:
    """Hostile or buggy JSON: every field of the wrong type. Nothing raises, nothing leaks."""
    session = make_session()
    weird: list[Any] = [None, 1, 1.5, True, "s", [], {}, [None], {"a": None}]
    for value in weird:
        for payload in (
            {"type": "assistant", "message": value, "parent_tool_use_id": value},
            {"type": "assistant", "message": {"content": value}},
            {
                "type": "assistant",
                "message": {
                    "content": [
                        value,
                        {"type": "tool_use", "id": value, "name": value, "input": value},
                    ]
                },
            },
            {
                "type": "user",
                "message": {
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": value,
                            "content": value,
                            "is_error": value,
                        }
                    ]
                },
            },
            {
                "type": "system",
                "subtype": "init",
                "tools": value,
                "mcp_servers": value,
                "model": value,
                "cwd": value,
            },
            {
                "type": "result",
                "usage": value,
                "total_cost_usd": value,
                "errors": value,
                "num_turns": value,
                "result": value,
                "permission_denials": value,
            },
            {"type": "stream_event", "event": value},
            {"type": "error", "message": value},
            {"type": "exit", "code": value},
            {"type": "turn_complete", "claude_session_id": value},
        ):
            for source in ("agent", "bridge", "dashboard"):
                event = add_event(session, source, payload)
                tools = ToolIndex()
                tools.observe(event)
                assert_safe(render_event(event, tools))
                assert_safe(render_event_oob(event, tools))


@pytest.mark.django_db
def test_it_replaces_lone_surrogates_so_the_page_can_be_encoded() -> None:
    session = make_session()
    event = add_event(
        session,
        "agent",
        r'{"type": "assistant", "message": {"content": '
        r'[{"type": "text", "text": "bad \ud800 half"}]}}',
    )
    html = render_event(event, ToolIndex())
    html.encode("utf-8")
    assert "bad" in html and "half" in html
    generic = add_event(session, "agent", r'{"type": "new_thing", "x": "\udfff"}')
    render_event(generic, ToolIndex()).encode("utf-8")


CONTROLS = "nul\x00 bell\x07 \x1b[31mRED\x1b[0m \x1b]0;window-name\x07 del\x7f back\x08 end"
# Not allowed in HTML's text; tab and line breaks are.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@pytest.mark.django_db
def test_it_shows_control_characters_and_drops_escape_sequences() -> None:
    session = make_session()
    tools = ToolIndex()
    events = _hostile_events(CONTROLS)  # a stderr line among them
    for source, data in events:
        event = add_event(session, source, data)
        tools.observe(event)
        for html in (render_event(event, tools), render_event_oob(event, tools)):
            assert not RAW_CONTROL.search(html), (source, data, html)
    text = render_event(
        add_event(session, "agent", _assistant([{"type": "text", "text": CONTROLS}])), tools
    )
    assert "nul\\x00 bell\\x07 RED  del\\x7f back\\x08 end" in text
    # Stored as the recorder stores it: a NUL (which PostgreSQL refuses) as `\u0000`.
    stderr = render_event(add_event(session, "stderr", CONTROLS), tools)
    assert "nul\\u0000 bell\\x07 RED  del\\x7f back\\x08 end" in stderr
    assert "[31m" not in text + stderr and "window-name" not in text + stderr


# ---------------------------------------------------------------------------------------
# Live delivery: out-of-band swaps for the htmx ws extension.


@pytest.mark.django_db
def test_it_wraps_live_events_in_oob_appends_to_the_right_list() -> None:
    session = make_session()
    agent = add_event(session, "agent", {"type": "ready"})
    stderr = add_event(session, "stderr", "log line")
    prompt = add_event(session, "dashboard", {"type": "prompt", "text": "go"})
    gap = add_event(session, "bridge", {"type": "gap", "message": "lost"})
    tools = ToolIndex()
    for event, target in (
        (agent, "#timeline"),
        (stderr, "#stderr-log"),
        (prompt, "#timeline"),
        (gap, "#timeline"),
    ):
        html = render_event_oob(event, tools)
        wrapper = root(html)
        assert wrapper.attrs["hx-swap-oob"] == f"beforeend:{target}"
        assert parse(html).elements[1].attrs["id"] == f"event-{event.seq}"
        assert_safe(html)


@pytest.mark.django_db
def test_it_swaps_the_call_status_marker_when_a_result_arrives_live() -> None:
    session = make_session()
    tools = ToolIndex()  # the bridge's, long-lived
    call = add_event(
        session,
        "agent",
        _assistant(
            [
                _tool_use("toolu_9", "Bash", {"command": "ls"}),
                _tool_use("toolu_10", "Read", {"file_path": "x"}),
            ]
        ),
    )
    tools.observe(call)
    call_html = render_event_oob(call, tools)
    assert 'id="toolstatus-toolu_9"' in call_html and "running" in call_html
    assert 'hx-swap-oob="outerHTML"' not in call_html

    answer = add_event(
        session,
        "agent",
        _user([_result("toolu_9", "ok"), _result("toolu_10", "nope", is_error=True)]),
    )
    tools.observe(answer)
    html = render_event_oob(answer, tools)
    page = assert_safe(html)
    swaps = [
        e
        for e in page.elements
        if e.attrs.get("hx-swap-oob") == "outerHTML" and e.attrs["id"].startswith("toolstatus")
    ]
    assert [(s.attrs["id"], sorted(s.classes)) for s in swaps] == [
        ("toolstatus-toolu_9", ["toolstatus", "toolstatus-done"]),
        ("toolstatus-toolu_10", ["toolstatus", "toolstatus-error"]),
    ]
    assert html.count(f'href="#event-{answer.seq}"') == 2
    # Each result is swapped into its call's card, and #timeline gets only the seq mark.
    slots = [e for e in page.elements if e.attrs.get("hx-swap-oob") == "true"]
    assert [s.attrs["id"] for s in slots] == ["toolresult-toolu_9", "toolresult-toolu_10"]
    assert not page.find("article")
    assert root(html).attrs["hx-swap-oob"] == "true"
    assert page.find("span", "seq-mark")[0].attrs["data-seq"] == str(answer.seq)


@pytest.mark.django_db
def test_it_finds_a_call_outside_the_rendered_slice_in_the_database() -> None:
    session = make_session()
    call = add_event(
        session, "agent", _assistant([_tool_use("toolu_old", "Grep", {"pattern": "needle"})])
    )
    for _ in range(5):
        add_event(session, "stderr", "noise")
    answer = add_event(session, "agent", _user([_result("toolu_old", "found")]))
    # A page that starts after the call (a live bridge after a restart works the same way).
    fresh = Event.objects.get(pk=answer.pk)
    html = render_event(fresh, ToolIndex.for_session(session, [fresh]))
    assert f'href="#event-{call.seq}"' in html and "Grep · needle" in html
    # And the other way: loading an older page whose call was answered later.
    older = Event.objects.get(pk=call.pk)
    older.session = session
    html = render_event(older, ToolIndex.for_session(session, [older]))
    assert "toolstatus-done" in html and f'href="#event-{answer.seq}"' in html


@pytest.mark.django_db
def test_it_says_no_result_for_calls_left_unanswered_by_a_finished_session() -> None:
    session = make_session(status=AgentSession.Status.EXITED)
    call = add_event(session, "agent", _assistant([_tool_use("toolu_x", "Bash", {"command": "x"})]))
    assert "no result" in render_event(call, ToolIndex.for_session(session, [call]))


@pytest.mark.django_db
def test_it_hashes_tool_ids_that_are_not_safe_in_html_ids() -> None:
    session = make_session()
    hostile = '"><script>alert(1)</script> toolu'
    call = add_event(session, "agent", _assistant([_tool_use(hostile, "Bash", {"command": "x"})]))
    answer = add_event(session, "agent", _user([_result(hostile, "ok")]))
    tools = ToolIndex.for_session(session, [call, answer])
    safe = dom_id(hostile)
    assert re.fullmatch(r"h[0-9a-f]{20}", safe)
    assert f'id="toolstatus-{safe}"' in render_event(call, tools)
    assert_safe(render_event_oob(answer, tools))
    assert f'id="toolstatus-{safe}"' in render_event_oob(answer, tools)


# ---------------------------------------------------------------------------------------
# Hostile content, everywhere it can appear.

XSS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    '<a href="javascript:alert(1)">x</a>',
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](jav&#x09;ascript:alert(1))",
    "[x](jav\tascript:alert(1))",
    "[x](&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1))",
    "[x](\\u006A\\u0061vascript:alert(1))",
    "![x](javascript:alert(1))",
    '![x](x" onerror="alert(1))',
    "<iframe src=https://evil.example></iframe>",
    '<iframe srcdoc="<script>alert(1)</script>">',
    "<body onload=alert(1)>",
    "<scr<script>ipt>alert(1)</scr</script>ipt>",
    '"><script>alert(1)</script>',
    "'><img src=x onerror=alert(1)>",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "<a href='data:text/html,<script>alert(1)</script>'>d</a>",
    "[v](vbscript:msgbox(1))",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<style>body{background:url(javascript:alert(1))}</style>",
    "<object data=javascript:alert(1)>",
    "<embed src=javascript:alert(1)>",
    "<form action=javascript:alert(1)><button>x</button></form>",
    "<div style=\"background:url('javascript:alert(1)')\">x</div>",
    '<a href="&#x6A;avascript:alert(1)">e</a>',
    "<<script>script>alert(1)<</script>/script>",
    "\u003cscript\u003ealert(1)\u003c/script\u003e",
    "<details open ontoggle=alert(1)>",
    '[link](https://example.com "title" onclick=alert(1))',
    '<http://example.com/"onmouseover="alert(1)>',
    "<!--<script>alert(1)//-->",
    "<meta http-equiv=refresh content=0;url=javascript:alert(1)>",
    "</textarea><script>alert(1)</script>",
    "{{ 7*7 }} {% debug %}",
]


def _hostile_events(payload: str) -> list[tuple[str, Any]]:
    """`payload` placed in every field a sandbox (or a person) controls."""
    return [
        ("agent", _assistant([{"type": "text", "text": payload}])),
        ("agent", _assistant([{"type": "thinking", "thinking": payload, "signature": payload}])),
        ("agent", _assistant([_tool_use(payload, payload, {"command": payload})])),
        (
            "agent",
            _assistant([_tool_use("t1", "Bash", {"command": payload, "description": payload})]),
        ),
        (
            "agent",
            _assistant([_tool_use("t2", "Write", {"file_path": payload, "content": payload})]),
        ),
        (
            "agent",
            _assistant(
                [
                    _tool_use(
                        "t3",
                        "Edit",
                        {"file_path": payload, "old_string": payload, "new_string": payload},
                    )
                ]
            ),
        ),
        (
            "agent",
            _assistant(
                [
                    _tool_use(
                        "t4",
                        "MultiEdit",
                        {
                            "file_path": payload,
                            "edits": [{"old_string": payload, "new_string": payload}],
                        },
                    )
                ]
            ),
        ),
        ("agent", _assistant([_tool_use("t5", "Other", {payload: payload, "url": payload})])),
        ("agent", _assistant([{"type": payload, payload: payload}])),
        ("agent", _assistant([{"type": "text", "text": "sub"}], parent=payload)),
        ("agent", _user(payload)),
        ("agent", _user([_result(payload, payload)])),
        ("agent", _user([_result("t1", payload, is_error=True)])),
        (
            "agent",
            _user(
                [
                    _result(
                        "t1",
                        [
                            {"type": "text", "text": payload},
                            {"type": "image", "source": {"media_type": payload}},
                            {"type": payload},
                        ],
                    )
                ]
            ),
        ),
        (
            "agent",
            {
                "type": "system",
                "subtype": "init",
                "session_id": payload,
                "model": payload,
                "cwd": payload,
                "tools": [payload],
                "permissionMode": payload,
                "mcp_servers": [{"name": payload, "status": payload}],
            },
        ),
        ("agent", {"type": "system", "subtype": payload, "x": payload}),
        (
            "agent",
            {
                "type": "system",
                "subtype": "compact_boundary",
                "compact_metadata": {"trigger": payload, "pre_tokens": payload},
            },
        ),
        (
            "agent",
            {
                "type": "result",
                "subtype": payload,
                "is_error": True,
                "result": payload,
                "errors": [payload],
                "num_turns": payload,
            },
        ),
        ("agent", {"type": "result", "subtype": "success", "result": payload}),
        (
            "agent",
            {
                "type": "stream_event",
                "event": {"type": payload, "delta": {"type": payload, "text": payload}},
            },
        ),
        ("agent", {"type": "tool_progress", "tool_name": payload}),
        ("agent", {"type": "tool_use_summary", "summary": payload}),
        ("agent", {"type": "error", "message": payload}),
        ("agent", {"type": "configured", payload: payload, "model": payload}),
        ("agent", {"type": "turn_complete", "claude_session_id": payload}),
        ("agent", {"type": payload, "data": payload}),
        ("agent", payload),  # a malformed line
        ("stderr", payload),
        ("dashboard", {"type": "prompt", "text": payload}),
        (
            "dashboard",
            {
                "type": "configure",
                "model": payload,
                "systemPrompt": payload,
                "allowedTools": [payload],
            },
        ),
        ("dashboard", {"type": "continue", "session": payload, "title": payload}),
        ("dashboard", {"type": "kill", "signal": payload}),
        ("bridge", {"type": "gap", "message": payload}),
        ("bridge", {"type": "lost", "reason": payload}),
        ("bridge", {"type": "exit", "code": payload}),
        ("bridge", {"type": "reconnected", "attempts": payload}),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("payload", XSS)
def test_it_never_lets_hostile_content_out(payload: str) -> None:
    session = make_session()
    actor = User.objects.create_user(payload[:150])  # usernames are people's, but still
    tools = ToolIndex()
    for source, data in _hostile_events(payload):
        event = add_event(session, source, data, actor if source == "dashboard" else None)
        tools.observe(event)
        for html in (render_event(event, tools), render_event_oob(event, tools)):
            assert_safe(html)
            assert "alert(1)</script>" not in html
    timeline = render_timeline(session, list(session.events.all()))
    assert_safe(timeline.timeline + timeline.stderr)


@pytest.mark.django_db
def test_it_keeps_safe_links_in_markdown_with_rel() -> None:
    session = make_session()
    event = add_event(
        session,
        "agent",
        _assistant(
            [{"type": "text", "text": "[docs](https://docs.example/x) and <mailto:a@b.example>"}]
        ),
    )
    page = assert_safe(render_event(event, ToolIndex()))
    links = [e for e in page.find("a") if e.in_markdown]
    assert [e.attrs["href"] for e in links] == ["https://docs.example/x", "mailto:a@b.example"]


# ---------------------------------------------------------------------------------------
# Truncation.


@pytest.mark.django_db
def test_it_caps_a_megabyte_tool_result_and_links_to_the_full_payload() -> None:
    session = make_session()
    call = add_event(
        session, "agent", _assistant([_tool_use("toolu_big", "Bash", {"command": "cat"})])
    )
    big = "0123456789abcdef\n" * (1024 * 1024 // 17)
    answer = add_event(session, "agent", _user([_result("toolu_big", big)]))
    tools = ToolIndex.for_session(session, [call, answer])
    html = render_event(call, tools)
    assert len(html) < 3 * TOOL_CAP
    page = assert_safe(html)
    assert "open" not in page.find("details", "blk-tool")[0].attrs, "cards start collapsed"
    link = page.find("a", "show-full")
    assert len(link) == 1
    assert link[0].attrs["href"] == f"/sessions/{session.id}/events/{answer.seq}/raw"
    assert re.search(r"show full \(1\.\d\xa0MB\)", html)


@pytest.mark.django_db
def test_it_caps_long_text_input_stderr_and_unknown_events() -> None:
    session = make_session()
    long = "x" * (rendering.DISPLAY_CAP + 10)
    events = [
        add_event(session, "agent", _assistant([{"type": "text", "text": long}])),
        add_event(
            session,
            "agent",
            _assistant([_tool_use("t", "Write", {"file_path": "a", "content": long})]),
        ),
        add_event(
            session,
            "agent",
            _assistant(
                [
                    _tool_use(
                        "t2",
                        "Edit",
                        {
                            "file_path": "a",
                            "old_string": "\n".join(["y" * 50] * 400),
                            "new_string": "",
                        },
                    )
                ]
            ),
        ),
        add_event(session, "stderr", long),
        add_event(session, "agent", {"type": "from_the_future", "blob": long}),
        add_event(session, "agent", "not json " + long),
        add_event(session, "dashboard", {"type": "prompt", "text": long}),
    ]
    tools = ToolIndex.for_session(session, events)
    for event in events:
        html = render_event(event, tools)
        assert len(html) < rendering.DISPLAY_CAP + 4000, event
        assert parse(html).find("a", "show-full"), event


# ---------------------------------------------------------------------------------------
# A long, realistic transcript.


@pytest.mark.django_db
def test_it_renders_the_whole_transcript_with_every_call_paired(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session = make_session(status=AgentSession.Status.EXITED)
    events = load_transcript(session)
    assert len(events) > 300
    with caplog.at_level(logging.WARNING, logger="dashboard.agents.rendering"):
        rendered = render_all(session, events)
    assert not caplog.records, "no event needed the fallback card"

    for event in events:
        element = root(rendered[event.seq])
        # An event, a fold of noise starting with it, or the mark of one drawn elsewhere.
        assert element.attrs.get("id") in (f"event-{event.seq}", f"fold-{event.seq}", None)
        assert element.attrs["data-seq"] == str(event.seq)
        assert_safe(rendered[event.seq])
    joined = "".join(rendered.values())
    page = parse(joined)
    ids = [e.attrs["id"] for e in page.elements if e.attrs.get("id", "").startswith("event-")]
    assert sorted(ids) == sorted(f"event-{e.seq}" for e in events), "each event exactly once"

    calls, results = _calls_and_results(events)
    assert len(calls) > 130 and set(calls) == set(results)
    for tool_id, (result_seq, is_error) in results.items():
        call_seq = calls[tool_id]
        # (A subagent's calls are drawn inside its Task's card, not at their own place.)
        status = _status(joined, tool_id)
        assert status == ("toolstatus-error" if is_error else "toolstatus-done"), tool_id
        assert f'href="#event-{result_seq}"' in joined
        if result_seq != call_seq:  # (server tools answer in the same turn)
            slot = f'id="toolresult-{dom_id(tool_id)}" class="tool-result-slot">'
            assert slot + '<div class="blk-result' in joined, tool_id

    kinds = {c for a in page.find("article") for c in a.classes if c.startswith("ev-")}
    assert kinds == {
        "ev-message",
        "ev-init",
        "ev-system",
        "ev-result",
        "ev-divider",
        "ev-notice",
        "ev-action",
        "ev-stream",
        "ev-stderr",
        "ev-generic",
    }
    assert "session resumed" in joined and "context compacted (auto)" in joined
    tasks = [c for c in page.find("div", "tool-children") if c.attrs["id"].startswith("toolchild")]
    assert tasks, "the subagent's work is drawn inside its Task card"
    assert "system events" in joined
    assert "rate_limit_event" in joined and "malformed line" in joined


@pytest.mark.django_db
def test_it_renders_the_transcript_live_through_one_bridge_index() -> None:
    session = make_session()
    events = load_transcript(session)
    tools = ToolIndex()
    swaps = 0
    for event in events:
        tools.observe(event)
        html = render_event_oob(event, tools)
        assert_safe(html)
        swaps += html.count('class="toolstatus toolstatus-done" hx-swap-oob="outerHTML"')
        swaps += html.count('class="toolstatus toolstatus-error" hx-swap-oob="outerHTML"')
    assert swaps == len(_calls_and_results(events)[1])


@pytest.mark.django_db
def test_it_splits_a_page_between_timeline_and_stderr_log() -> None:
    session = make_session()
    events = load_transcript(session)
    page = render_timeline(session, events)
    stderr = [e for e in events if e.source == "stderr"]
    assert page.stderr.count('class="ev ev-stderr') == len(stderr)
    shown = [e for e in parse(page.timeline).elements if e.attrs.get("id", "").startswith("event-")]
    assert len(shown) == len(events) - len(stderr)


def _calls_and_results(events: list[Event]) -> tuple[dict[str, int], dict[str, tuple[int, bool]]]:
    calls: dict[str, int] = {}
    results: dict[str, tuple[int, bool]] = {}
    for event in events:
        data = event.data or {}
        message = data.get("message") if data.get("type") in ("assistant", "user") else None
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if block.get("type") in ("tool_use", "server_tool_use"):
                calls[block["id"]] = event.seq
            elif "tool_use_id" in block:
                results[block["tool_use_id"]] = (event.seq, block.get("is_error") is True)
    return calls, results


def _status(html: str, tool_id: str) -> str:
    for element in parse(html).find("span", "toolstatus"):
        if element.attrs["id"] == f"toolstatus-{dom_id(tool_id)}":
            return next(c for c in element.classes if c != "toolstatus")
    raise AssertionError(f"no status marker for {tool_id}")


# ---------------------------------------------------------------------------------------
# Sizes and shapes meant to hurt.


@pytest.mark.django_db
def test_it_caps_the_number_of_blocks_and_result_parts() -> None:
    session = make_session()
    many = add_event(
        session, "agent", _assistant([{"type": "text", "text": f"b{n}"} for n in range(5000)])
    )
    parts = [{"type": "text", "text": f"p{n}"} for n in range(5000)] + [{"type": "text"}] * 10
    answer = add_event(session, "agent", _user([_result("t", parts)]))
    tools = ToolIndex()
    html = render_event(many, tools)
    assert html.count('class="blk blk-text md"') == rendering.MAX_BLOCKS
    assert "4900 more blocks not shown" in html and parse(html).find("a", "show-full")
    html = render_event(answer, tools)
    assert html.count("result-text") == rendering.MAX_PARTS
    assert parse(html).find("a", "show-full")


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [100, 900, 5000])
def test_it_survives_deep_nesting(depth: int) -> None:
    session = make_session()
    nested = "[" * depth + "]" * depth
    for raw in (
        f'{{"type": "from_the_future", "x": {nested}}}',
        f'{{"type": "assistant", "message": {{"content": [{{"type": "tool_use", "id": "t", '
        f'"name": "Other", "input": {{"x": {nested}}}}}]}}}}',
        f'{{"type": "user", "message": {{"content": [{{"type": "tool_result", '
        f'"tool_use_id": "t", "content": [{nested}]}}]}}}}',
    ):
        event = add_event(session, "agent", raw)
        html = render_event(event, ToolIndex())
        assert root(html).attrs["id"] == f"event-{event.seq}"
        assert_safe(html)
