"""Session export: JSON Lines that round-trip every event, and a readable Markdown transcript."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from html.parser import HTMLParser
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.test import Client, RequestFactory
from django.urls import reverse
from markdown_it import MarkdownIt

from dashboard.agents import downloads
from dashboard.agents.export import (
    RESULT_CAP,
    fence,
    inline_code,
    iter_session_markdown,
    session_jsonl,
    session_markdown,
)
from dashboard.agents.models import AgentSession, Event
from dashboard.asgi import application
from tests.agents.helpers import cookie_for, wait_for
from tests.agents.test_rendering import add_event, load_transcript, make_session


def _transcript_session() -> tuple[AgentSession, list[Event]]:
    session = make_session(
        status=AgentSession.Status.KILLED,
        model="claude-sonnet-4-20250514",
        total_cost_usd=Decimal("2.6363"),
        num_turns=142,
        exit_code=137,
    )
    return session, load_transcript(session)


@pytest.mark.django_db
def test_it_round_trips_every_event_as_json_lines_in_order() -> None:
    session, events = _transcript_session()
    lines = list(session_jsonl(session, Event.objects.filter(session=session).order_by("seq")))
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        assert "\n" not in line
        record = json.loads(line)
        assert record["seq"] == event.seq
        assert datetime.fromisoformat(record["time"]) == event.created_at
        assert record["source"] == event.source
        assert record["type"] == event.type
        if event.actor_id:
            assert record["actor"] == event.actor.username
        else:
            assert record["actor"] is None
        if event.data is not None:
            assert record["event"] == json.loads(event.raw)
            assert "raw" not in record
        else:
            assert record["raw"] == event.raw
            assert "event" not in record
    sources = {json.loads(line)["source"] for line in lines}
    assert sources == {"agent", "stderr", "dashboard", "bridge"}
    raws = [json.loads(line) for line in lines if "raw" in json.loads(line)]
    assert any(r["source"] == "agent" for r in raws), "malformed lines keep their text"


@pytest.mark.django_db
def test_it_streams_json_lines_lazily() -> None:
    session = make_session()
    add_event(session, "agent", {"type": "ready"})

    def events() -> Iterator[Event]:
        yield from Event.objects.filter(session=session)
        raise AssertionError("consumed too far")

    stream = session_jsonl(session, events())
    assert json.loads(next(stream))["event"] == {"type": "ready"}


@pytest.mark.django_db
def test_it_keeps_lone_surrogates_encodable_in_json_lines() -> None:
    session = make_session()
    add_event(session, "agent", r'{"type": "assistant", "x": "half \ud800 pair"}')
    (line,) = session_jsonl(session, session.events.all())
    line.encode("utf-8")
    assert json.loads(line)["event"]["x"] == "half \ud800 pair"


@pytest.mark.django_db
def test_it_writes_a_readable_markdown_transcript() -> None:
    session, events = _transcript_session()
    text = session_markdown(session, events)
    text.encode("utf-8")
    # Header.
    assert text.startswith("# Add signup validation\n")
    for fact in (
        "**Status:** Killed (exit code 137)",
        "**Model:** claude-sonnet-4-20250514",
        "**Cost:** $2.6363",
        "**Turns:** 142",
    ):
        assert fact in text
    # Prompts, attributed; assistant text; tool calls with inputs; results; errors.
    assert "### alice sent a prompt\n\n> Add input validation to the signup form" in text
    assert "### bob sent a prompt" in text
    assert "**Assistant:**" in text and "Here's the **plan**" in text
    assert "**Tool call** `Bash`\n\n```bash\ngit status --short && ls\n```" in text
    assert "**Tool result** of `Bash`" in text
    assert "**Tool result** of `Read` (error)" in text
    assert '"pattern": "class SignupForm"' in text
    assert "*(inside Task)*" in text
    assert "**Result:** success · 18 turns · $0.2841" in text
    assert "**Result:** error max turns" in text and "- error: Reached maximum number" in text
    assert "> **Agent error:** claude exited: rate limited" in text
    assert "> **Warning:** output was lost (18,211 bytes)" in text
    assert "*alice interrupted.*" in text and "*alice killed the session.*" in text
    assert "*The process exited with code 137.*" in text
    # Stream partials and stderr stay out of the readable transcript.
    assert "content_block_delta" not in text and "[wrapper]" not in text


@pytest.mark.django_db
def test_it_survives_backticks_in_content() -> None:
    """A Write of a markdown file full of fences must not close ours early."""
    session, events = _transcript_session()
    text = session_markdown(session, events)
    tokens = MarkdownIt("commonmark").parse(text)
    fences = [t for t in tokens if t.type == "fence"]
    write = next(t for t in fences if "# Validation" in t.content)
    assert "```bash\npytest -q\n```" in write.content
    assert "````quadruple````" in write.content
    assert write.markup == "`````", "one backtick longer than the longest run inside"
    # Every tool input/result landed inside a fence, not in the prose.
    assert all(t.info in ("", "json", "bash", "diff") for t in fences)
    assert "**Tool call** `Write` `/workspace/app/docs/validation.md`" in text
    edit = next(t for t in fences if t.info == "diff" and "max_length=254" in t.content)
    assert edit.content == (
        "-    email = forms.EmailField()\n"
        "+    email = forms.EmailField(max_length=254)\n"
        "+    # validated in clean_email\n"
    )


@pytest.mark.django_db
def test_it_caps_tool_results_in_markdown_with_a_note() -> None:
    session = make_session()
    add_event(
        session,
        "agent",
        {
            "type": "assistant",
            "message": {
                "content": [
                    {
                        "type": "tool_use",
                        "id": "t1",
                        "name": "Bash",
                        "input": {"command": "cat big"},
                    }
                ]
            },
        },
    )
    big = add_event(
        session,
        "agent",
        {
            "type": "user",
            "message": {
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "z" * (RESULT_CAP * 10)}
                ]
            },
        },
    )
    text = session_markdown(session, session.events.all())
    assert text.count("z") == RESULT_CAP
    assert f"{RESULT_CAP * 9:,} more characters" in text and f"event {big.seq}" in text


@pytest.mark.django_db
def test_it_yields_markdown_piece_by_piece_and_never_raises() -> None:
    session = make_session()
    user = User.objects.create_user("dana")
    for payload in (
        {"type": "assistant", "message": {"content": [None, 1, {"type": "text", "text": None}]}},
        {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": 5}]}},
        {"type": "result", "subtype": None, "num_turns": "x", "errors": "nope", "usage": []},
        {"type": "error", "message": {"nested": True}},
        "not json",
    ):
        add_event(session, "agent", payload)
    add_event(session, "dashboard", {"type": "prompt", "text": ["not", "text"]}, actor=user)
    add_event(session, "bridge", {"type": "gap", "lost_bytes": "lots"})
    pieces = list(iter_session_markdown(session, session.events.all()))
    assert len(pieces) > 3
    assert "dana sent a prompt" in "".join(pieces)


def test_it_makes_fences_and_inline_code_longer_than_their_content() -> None:
    assert fence("plain") == "```\nplain\n```\n\n"
    assert fence("a ``` b", "json") == "````json\na ``` b\n````\n\n"
    assert fence("`````").startswith("``````\n")
    assert inline_code("Bash") == "`Bash`"
    assert inline_code("a`b") == "``a`b``"
    assert inline_code("`x`") == "`` `x` ``"


@pytest.mark.django_db
def test_it_exports_deeply_nested_events_without_failing() -> None:
    session = make_session()
    depth = 900
    raw = '{"type": "x", "v": ' + "[" * depth + "]" * depth + "}"
    add_event(session, "agent", raw)
    (line,) = session_jsonl(session, session.events.all())
    record = json.loads(line)
    assert record.get("raw") == raw or record["event"]["type"] == "x"
    assert session_markdown(session, session.events.all()).startswith("# ")


# ---------------------------------------------------------------------------------------
# Hostile content: the Markdown file must stay inert in any renderer (issue 10).

HOSTILE_TEXT = "\n".join(
    [
        "<script>alert('text')</script>",
        '<img src=x onerror="alert(1)">',
        "Hello <b onmouseover=alert(2)>there</b> & <i>you</i>",
        "[click](javascript:alert(3)) [nl](",
        "javascript:alert(4)) [ent](jav&#x61;script:alert(5)) [bs](javascript\\:alert(6))",
        "<javascript:alert(7)> ![img](data:text/html;base64,PHNjcmlwdD4=)",
        "[ref]: javascript:alert(8)",
        "",
        "[ref] and [ok](https://example.org/ok)",
        "A pixel: ![tracker](https://example.org/pixel.png) and \\![escaped](https://e.org/x)",
        "",
        '`<img src="` onerror=alert(9) x="`">',
        "",
        "- item",
        "  ```",
        "after the list",
        "<iframe src=javascript:alert(10)></iframe>",
        "",
        "```html",
        "<div>code stays code</div>",
        "```",
        "",
        "```",
        "an unclosed fence",
    ]
)
# Link reference definitions whose label spans lines (CommonMark allows it), in containers
# too: each would make the reference below it a working `javascript:` link.
HOSTILE_REFERENCES = "\n".join(
    [
        "[foo",
        "bar]: javascript:alert(18)",
        "",
        "[foo bar]",
        "",
        "  [b",
        "]: javascript:alert(19)",
        "",
        "[b]",
        "",
        "> [quo",
        "> ted]: javascript:alert(20)",
        "",
        "[quo ted]",
        "",
        "- [li",
        "  st]: javascript:alert(21)",
        "",
        "[li st]",
        "",
        "[nl]:",
        "javascript:alert(22)",
        "",
        "[nl]",
        "",
        "[esc\\\\]: javascript:alert(23)",
        "",
        "[esc\\\\]",
        "",
        "[x",
        "",
    ]
)


def _hostile_session() -> AgentSession:
    session = make_session(
        title="<img src=x onerror=\"alert('title')\">", model="<script>alert('model')</script>"
    )
    user = User.objects.create_user("mallory")
    add_event(session, "dashboard", {"type": "prompt", "text": HOSTILE_TEXT}, actor=user)
    add_event(session, "dashboard", {"type": "prompt", "text": HOSTILE_REFERENCES}, actor=user)
    add_event(session, "agent", {"type": "system", "subtype": "init", "model": "<svg onload=x>"})
    add_event(
        session,
        "agent",
        {
            "type": "assistant",
            "message": {
                "content": [
                    {"type": "text", "text": HOSTILE_TEXT},
                    {"type": "tool_use", "id": "t1", "name": "<svg onload=alert(11)>", "input": {}},
                ]
            },
        },
    )
    # Inside the tool above, a result whose fence is longer than the agent's unclosed one.
    add_event(
        session,
        "agent",
        {
            "type": "user",
            "parent_tool_use_id": "t1",
            "message": {
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": "```\n<script>alert('result')</script>",
                    },
                    {"type": "text", "text": "<object data=javascript:alert(12)>"},
                ]
            },
        },
    )
    add_event(
        session,
        "agent",
        {
            "type": "result",
            "subtype": "<marquee>",
            "errors": ["<img src=x onerror=alert(13)>"],
        },
    )
    add_event(session, "agent", {"type": "error", "message": "<script>alert(14)</script>"})
    add_event(session, "bridge", {"type": "gap", "message": "<img src=x onerror=alert(15)>"})
    add_event(session, "bridge", {"type": "lost", "reason": "<img src=x onerror=alert(16)>"})
    cont = {"type": "continue", "title": "<script>alert(17)</script>"}
    add_event(session, "dashboard", cont, actor=user)
    return session


SAFE_TAGS = {
    "h1",
    "h3",
    "p",
    "strong",
    "em",
    "ul",
    "ol",
    "li",
    "hr",
    "blockquote",
    "pre",
    "code",
    "a",
    "br",
}  # fmt: skip  (no img: an image in the agent's text would be fetched by whoever opens it)


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, attrs))


def _elements(html: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    parser = _Elements()
    parser.feed(html)
    return parser.found


@pytest.mark.django_db
@pytest.mark.parametrize("preset", ["commonmark", "default"])
def test_it_writes_markdown_that_stays_inert_in_a_permissive_renderer(preset: str) -> None:
    session = _hostile_session()
    text = session_markdown(session, session.events.order_by("seq"))
    # A renderer that passes raw HTML through and accepts every link scheme.
    renderer = MarkdownIt(preset, {"html": True})
    renderer.validateLink = lambda url: True  # type: ignore[method-assign]
    html = renderer.render(text)
    for tag, attrs in _elements(html):
        assert tag in SAFE_TAGS, (tag, attrs)
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            scheme = re.match(r"\s*([a-zA-Z][a-zA-Z0-9+.-]*):", value or "")
            if name in ("href", "src") and scheme:
                assert scheme.group(1).lower() in ("https", "http", "mailto"), (tag, value)
    # Readable still: code in the agent's fences stays code, the safe link stays a link.
    assert '<pre><code class="language-html">&lt;div&gt;code stays code&lt;/div&gt;' in html
    assert '<a href="https://example.org/ok">ok</a>' in html
    assert '<a href="https://example.org/pixel.png">tracker</a>' in html  # a link, not fetched
    assert "Hello &lt;b" in html


# ---------------------------------------------------------------------------------------
# Streaming downloads: bounded chunks, lazily, a few at a time per person (issue 11).


def _many_events(session: AgentSession, count: int) -> None:
    Event.objects.bulk_create(
        Event(
            session=session,
            seq=seq,
            source="agent",
            type="assistant",
            raw=json.dumps(
                {"type": "assistant", "message": {"content": [{"type": "text", "text": f"n{seq}"}]}}
            ),
        )
        for seq in range(1, count + 1)
    )


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every query the downloads make: (after, limit, rows returned)."""
    seen: list[tuple[int, int, int]] = []
    real = downloads._events_after

    def spy(session_id: object, after: int, limit: int) -> list[Event]:
        rows = real(session_id, after, limit)
        seen.append((after, limit, len(rows)))
        return rows

    monkeypatch.setattr(downloads, "_events_after", spy)
    return seen


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["jsonl", "md"])
async def test_it_streams_a_download_chunk_by_chunk(
    kind: str, reads: list[tuple[int, int, int]]
) -> None:
    session = await database_sync_to_async(make_session)()
    await database_sync_to_async(_many_events)(session, 1_234)
    stream = (
        downloads.stream_jsonl(session, 100)
        if kind == "jsonl"
        else downloads.stream_markdown(session, 100)
    )
    first = await anext(stream)
    if kind == "md":
        assert first.startswith("# ") and reads == []  # the header needs no event at all
        first = await anext(stream)
    # The first bytes leave after one bounded query, whatever the session's length.
    assert reads == [(0, 100, 100)]
    rest = [text async for text in stream]
    assert all(limit == 100 and rows <= 100 for _, limit, rows in reads)
    assert [after for after, _, _ in reads] == list(range(0, 1_300, 100))
    text = first + "".join(rest)
    if kind == "jsonl":
        assert [json.loads(line)["seq"] for line in text.splitlines()] == list(range(1, 1_235))
    else:
        assert text.count("**Assistant:**") == 1_234 and text.index("n1233") < text.index("n1234")


@pytest.mark.django_db
def test_it_limits_concurrent_downloads_per_person(alice: User, bob: User) -> None:
    session = make_session()
    request = RequestFactory().get("/")
    request.user = alice
    first = downloads.download(request, session, "jsonl", "a.jsonl")
    second = downloads.download(request, session, "md", "a.md")
    assert first.status_code == second.status_code == 200
    refused = downloads.download(request, session, "jsonl", "a.jsonl")
    assert refused.status_code == 429
    assert b"You already have 2 downloads running" in refused.content
    other = RequestFactory().get("/")
    other.user = bob
    bobs = downloads.download(other, session, "jsonl", "b.jsonl")  # someone else is not held up
    assert bobs.status_code == 200
    first.close()  # finished, failed or abandoned: Django closes every response
    again = downloads.download(request, session, "jsonl", "a.jsonl")
    assert again.status_code == 200
    for response in (second, bobs, again):
        response.close()
    assert downloads.SLOTS.running == {}


@pytest.mark.django_db(transaction=True)  # the download reads in a thread of its own
def test_it_answers_429_to_a_third_download_at_once(
    client: Client, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slots of its own: a response another test left unclosed must not decide this one.
    monkeypatch.setattr(downloads, "SLOTS", downloads.ExportSlots(downloads.MAX_EXPORTS_PER_USER))
    session = make_session()
    add_event(session, "agent", {"type": "ready"})
    client.force_login(alice)
    url = reverse("export_jsonl", args=[session.id])
    first, second = client.get(url), client.get(reverse("export_markdown", args=[session.id]))
    assert first.status_code == second.status_code == 200 and first.streaming
    refused = client.get(url)
    assert refused.status_code == 429
    assert "downloads running" in refused.content.decode()
    assert json.loads(b"".join(first))["seq"] == 1  # read to the end, then closed
    third = client.get(url)
    assert third.status_code == 200
    for response in (second, third):
        b"".join(response)
    assert downloads.SLOTS.running == {}


@pytest.mark.django_db(transaction=True)
async def test_it_gives_the_slot_back_when_the_server_fails_mid_download(alice: User) -> None:
    """Django closes the response only when the download ends or the browser says it left;
    when sending fails (a server whose client vanished) or the task is cancelled, it skips
    close(), and the slot must come back all the same."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(downloads, "SLOTS", downloads.ExportSlots(downloads.MAX_EXPORTS_PER_USER))
    try:
        session = await database_sync_to_async(make_session)()
        for _ in range(3):
            await database_sync_to_async(add_event)(session, "agent", {"type": "ready"})
        cookie = await database_sync_to_async(cookie_for)(alice)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": reverse("export_jsonl", args=[session.id]),
            "query_string": b"",
            "headers": [(b"host", b"localhost"), (b"cookie", cookie)],
            "client": ("127.0.0.1", 50000),
            "server": ("localhost", 80),
        }
        requested = False
        started = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client never says it left
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                assert downloads.SLOTS.running, "the download holds a slot while it runs"
                started.set()
                raise OSError("the client went away")

        asgi: Any = application  # (a bare ASGI call: no typed scope needed here)
        with pytest.raises(OSError, match="went away"):
            await asgi(scope, receive, send)
        assert started.is_set()

        async def released() -> bool:
            gc.collect()
            return not downloads.SLOTS.running

        await wait_for(released, timeout=10)
    finally:
        monkeypatch.undo()


class _Download:
    """One GET through the ASGI application, as a server would drive it, whose client
    reads the first piece of the body and then stops reading until `go_on` is set: a
    download held open, mid-stream, for as long as the test wants."""

    def __init__(self, path: str, cookie: bytes, accept: bytes = b"*/*") -> None:
        self.path, self.cookie, self.accept = path, cookie, accept
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.reading = asyncio.Event()  # the first piece of the body arrived
        self.go_on = asyncio.Event()
        self.task: asyncio.Task[None] = asyncio.create_task(self._run())

    async def _run(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": self.path,
            "query_string": b"",
            "headers": [
                (b"host", b"localhost"),
                (b"cookie", self.cookie),
                (b"accept", self.accept),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("localhost", 80),
        }
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.headers = {k.lower(): v for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")
                if not self.reading.is_set():
                    self.reading.set()
                    await self.go_on.wait()

        asgi: Any = application
        await asgi(scope, receive, send)

    async def finished(self) -> bytes:
        self.go_on.set()
        await asyncio.wait_for(self.task, 30)
        return bytes(self.body)


@pytest.mark.django_db(transaction=True)  # the downloads read in threads of their own
async def test_it_streams_two_downloads_at_once_per_person_and_refuses_a_third(
    alice: User, bob: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the ASGI application, concurrently: two of Alice's downloads held open
    mid-stream, a third refused with a 429 that says why and when to retry (a page, for a
    browser), Bob's not held up; once one of hers ends, she may start another."""
    monkeypatch.setattr(downloads, "SLOTS", downloads.ExportSlots(downloads.MAX_EXPORTS_PER_USER))
    session = await database_sync_to_async(make_session)()
    await database_sync_to_async(_many_events)(session, 1_200)  # three chunks of 500
    alices = await database_sync_to_async(cookie_for)(alice)
    bobs = await database_sync_to_async(cookie_for)(bob)
    jsonl = reverse("export_jsonl", args=[session.id])
    markdown = reverse("export_markdown", args=[session.id])

    first, second = _Download(jsonl, alices), _Download(markdown, alices)
    await asyncio.wait_for(asyncio.gather(first.reading.wait(), second.reading.wait()), 30)
    assert first.status == second.status == 200
    # Streaming: the first bytes are out, the end is not read yet.
    assert first.body.startswith(b'{"seq": 1,') and b'"seq": 1200,' not in first.body
    assert downloads.SLOTS.running == {alice.pk: 2}

    refused = _Download(jsonl, alices)
    assert b"downloads running" in await refused.finished()
    assert refused.status == 429 and refused.headers[b"retry-after"] == b"10"
    assert refused.headers[b"content-type"].startswith(b"text/plain")
    page = _Download(markdown, alices, accept=b"text/html,application/xhtml+xml,*/*;q=0.8")
    html = (await page.finished()).decode()
    assert page.status == 429 and page.headers[b"retry-after"] == b"10"
    assert "Too many downloads at once" in html and "You already have 2 downloads" in html
    assert f'href="{session.get_absolute_url()}"' in html

    other = _Download(jsonl, bobs)
    assert other.status in (0, 200)
    assert len((await other.finished()).splitlines()) == 1_200

    lines = (await first.finished()).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 1_201))

    async def one_slot_free() -> bool:
        return downloads.SLOTS.running.get(alice.pk) == 1

    await wait_for(one_slot_free, timeout=10)
    again = _Download(jsonl, alices)
    assert len((await again.finished()).splitlines()) == 1_200 and again.status == 200
    assert (await second.finished()).decode().count("**Assistant:**") == 1_200

    async def all_free() -> bool:
        return not downloads.SLOTS.running

    await wait_for(all_free, timeout=10)
