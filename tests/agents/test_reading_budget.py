"""Rendering has a budget per event (issue 7, "render bombs").

A hostile agent can print one 2 MB assistant message of 100 blocks of 20,000 `[`: markdown
parsing such text costs tens of microseconds per character. The budget bounds the work
every event may cost (and a page render as a whole), and what lies past it is shown as
"large: download" with the full payload one click away and in the export.

Work is measured deterministically (what goes into the markdown renderer and the
highlighter, weighed by `markdown.work`), never with a clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils.safestring import SafeString

from dashboard.agents import markdown
from dashboard.agents.rendering import ToolIndex, budget, render_event
from dashboard.agents.rendering import agent as agent_rendering
from tests.agents.test_rendering import add_event, assert_safe, make_session

pytestmark = pytest.mark.django_db

BOMB_TEXT = "[" * 20_000
BOMB = {
    "type": "assistant",
    "message": {
        "id": "msg_bomb",
        "role": "assistant",
        "content": [{"type": "text", "text": BOMB_TEXT} for _ in range(100)],
    },
}


@pytest.fixture
def markdown_work(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every call into the markdown renderer, as its work."""
    calls: list[int] = []
    real = markdown.render_markdown

    def counting(text: str) -> SafeString:
        calls.append(markdown.work(text))
        return real(text)

    monkeypatch.setattr(agent_rendering, "render_markdown", counting)
    yield calls


def content(response: Any) -> bytes:
    """A response's body, streamed (sync or async) or not."""
    if not getattr(response, "streaming", False):
        return bytes(response.content)
    if getattr(response, "is_async", False):

        async def collect() -> bytes:
            return b"".join([chunk async for chunk in response.streaming_content])

        return asyncio.run(collect())
    return b"".join(response.streaming_content)


def test_it_weighs_markdown_by_the_characters_that_make_the_parser_work() -> None:
    assert markdown.work("plain words") == len("plain words")
    assert markdown.work("[" * 1000) > 10 * 1000
    # Code inside a fence is not parsed as inline markdown, so it costs only its length.
    fenced = "```python\n" + "x = [[1], [2]]\n" * 100 + "```\n"
    assert markdown.work(fenced) == len(fenced)


def test_it_renders_a_render_bomb_within_the_event_budget(markdown_work: list[int]) -> None:
    session = make_session()
    event = add_event(session, "agent", BOMB)
    html = render_event(event, ToolIndex.for_session(session, [event]))

    assert sum(markdown_work) <= budget.EVENT_WORK
    assert len(html) < 2 * budget.EVENT_SHOWN + 20_000
    assert "large" in html
    assert reverse("event_raw", args=[session.id, event.seq]) in html
    assert_safe(html)


def test_it_still_formats_ordinary_long_prose(markdown_work: list[int]) -> None:
    session = make_session()
    prose = "Some **bold** words and a [link](https://example.com).\n\n" * 150
    event = add_event(
        session,
        "agent",
        {"type": "assistant", "message": {"content": [{"type": "text", "text": prose}]}},
    )
    html = render_event(event, ToolIndex.for_session(session, [event]))
    assert html.count("<strong>bold</strong>") == 150
    assert markdown_work and sum(markdown_work) <= budget.EVENT_WORK


def test_it_shows_text_past_the_work_budget_as_plain_escaped_text(
    markdown_work: list[int],
) -> None:
    session = make_session()
    text = "<b>x</b>[" * 4_000
    event = add_event(
        session,
        "agent",
        {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}},
    )
    html = render_event(event, ToolIndex.for_session(session, [event]))
    assert markdown_work == []
    assert "&lt;b&gt;x&lt;/b&gt;[" in html
    assert "too large to format" in html
    assert_safe(html)


def test_it_answers_a_session_page_full_of_bombs_within_the_page_budget(
    alice: User, markdown_work: list[int]
) -> None:
    session = make_session()
    for _ in range(30):
        add_event(session, "agent", BOMB)
    client = Client()
    client.force_login(alice)

    response = client.get(reverse("session", args=[session.id]))

    assert response.status_code == 200
    assert sum(markdown_work) <= budget.PAGE_WORK
    # Every event pays at most its budget in what it shows.
    assert len(response.content) < 30 * (2 * budget.EVENT_SHOWN + 20_000)
    assert response.content.decode().count("large") >= 30


@pytest.mark.django_db(transaction=True)  # the export streams from another thread
def test_it_keeps_the_full_payload_of_a_bomb_in_the_export_and_the_raw_download(
    alice: User,
) -> None:
    session = make_session()
    event = add_event(session, "agent", BOMB)
    client = Client()
    client.force_login(alice)

    raw = client.get(reverse("event_raw", args=[session.id, event.seq]))
    assert json.loads(content(raw)) == BOMB
    assert raw["Content-Disposition"] == f'attachment; filename="event-{event.seq}.json"'
    stderr = add_event(session, "stderr", "not json at all")
    plain = client.get(reverse("event_raw", args=[session.id, stderr.seq]))
    assert plain["Content-Disposition"] == f'attachment; filename="event-{stderr.seq}.txt"'
    body = content(client.get(reverse("export_jsonl", args=[session.id])))
    lines = [json.loads(line) for line in body.decode().splitlines() if line]
    stored: list[Any] = [line for line in lines if line.get("seq") == event.seq]
    assert stored and BOMB_TEXT in json.dumps(stored[0])
