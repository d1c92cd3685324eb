"""One card per tool call (issue 12): the call's input and, once it arrives, its result;
results out of order still land in their own call's card; a subagent's work nests inside
its Task's card; runs of low-value events fold into one line. On a page render the card is
drawn whole; live, each later piece is swapped into it by id (htmx out-of-band swaps)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering import ToolIndex, render_event, render_event_oob, render_timeline
from dashboard.agents.rendering.tools import MAX_DEPTH
from tests.agents.test_reading_budget import content
from tests.agents.test_rendering import add_event, assert_safe, make_session, parse

pytestmark = pytest.mark.django_db


def call(tool_id: str, name: str = "Bash", parent: str | None = None, **tool_input: Any) -> dict:
    tool_input = tool_input or {"command": f"echo {tool_id}"}
    return {
        "type": "assistant",
        "parent_tool_use_id": parent,
        "message": {
            "content": [{"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}]
        },
    }


def calls(*tool_ids: str) -> dict:
    content = [
        {"type": "tool_use", "id": t, "name": "Bash", "input": {"command": f"echo {t}"}}
        for t in tool_ids
    ]
    return {"type": "assistant", "message": {"content": content}}


def result(tool_id: str, text: str, parent: str | None = None, error: bool = False) -> dict:
    block = {"type": "tool_result", "tool_use_id": tool_id, "content": text, "is_error": error}
    return {"type": "user", "parent_tool_use_id": parent, "message": {"content": [block]}}


def timeline(session: AgentSession) -> str:
    return render_timeline(session, list(session.events.order_by("seq"))).timeline


def slot_text(html: str, tool_id: str) -> str:
    """The text inside one call's result slot."""
    start = html.index(">", html.index(f'id="toolresult-{tool_id}"')) + 1
    depth, index = 1, start
    while depth:
        opening, closing = html.find("<div", index), html.find("</div>", index)
        if opening != -1 and opening < closing:
            depth, index = depth + 1, opening + 4
        else:
            depth, index = depth - 1, closing + 6
    return "".join(parse(html[start : index - 6]).text).strip()


def status(html: str, tool_id: str) -> str:
    for element in parse(html).find("span", "toolstatus"):
        if element.attrs["id"] == f"toolstatus-{tool_id}":
            return next(c for c in element.classes if c != "toolstatus").removeprefix("toolstatus-")
    raise AssertionError(f"no status for {tool_id}")


def test_it_draws_a_result_inside_its_call_card_with_status_and_duration() -> None:
    session = make_session()
    first = add_event(session, "agent", call("toolu_a", command="ls -la"))
    answer = add_event(session, "agent", result("toolu_a", "a.py\nb.py"))
    Event.objects.filter(pk=answer.pk).update(created_at=first.created_at + timedelta(seconds=2.5))

    html = timeline(session)
    page = assert_safe(html)

    assert slot_text(html, "toolu_a") == "a.py\nb.py"
    assert status(html, "toolu_a") == "done"
    assert page.find("span", "tool-duration")[0].attrs["id"] == "toolduration-toolu_a"
    assert "2.5 s" in html
    # Collapsed, the card still says what it ran and how it went, in one line.
    summary = page.find("summary", "tool-head")[0]
    assert summary and "ls -la" in html
    assert len(page.find("article")) == 1, "no second card for the result"


def test_it_lands_results_that_arrive_out_of_order_in_their_own_cards() -> None:
    session = make_session()
    add_event(session, "agent", calls("toolu_1", "toolu_2", "toolu_3"))
    add_event(session, "agent", result("toolu_3", "third"))
    add_event(session, "agent", result("toolu_1", "first", error=True))
    add_event(session, "agent", result("toolu_2", "second"))

    html = timeline(session)
    texts = [slot_text(html, f"toolu_{n}") for n in (1, 2, 3)]
    assert texts == ["errorfirst", "second", "third"]  # (an error is labelled so)
    assert [status(html, f"toolu_{n}") for n in (1, 2, 3)] == ["error", "done", "done"]


def test_it_swaps_results_into_their_cards_live_in_any_order() -> None:
    session = make_session()
    tools = ToolIndex()  # the bridge's: it sees each event once, as it is recorded
    fragments = []
    for payload in (
        calls("toolu_1", "toolu_2"),
        result("toolu_2", "second"),
        result("toolu_1", "first"),
    ):
        event = add_event(session, "agent", payload)
        tools.observe(event)
        fragments.append(render_event_oob(event, tools))

    opened = parse(fragments[0])
    assert [s.attrs["id"] for s in opened.find("div", "tool-result-slot")] == [
        "toolresult-toolu_1",
        "toolresult-toolu_2",
    ]
    assert status(fragments[0], "toolu_1") == "running"
    for fragment, tool_id, text in (
        (fragments[1], "toolu_2", "second"),
        (fragments[2], "toolu_1", "first"),
    ):
        page = assert_safe(fragment)
        (swap,) = [e for e in page.elements if e.attrs.get("hx-swap-oob") == "true"]
        assert swap.attrs["id"] == f"toolresult-{tool_id}"
        assert slot_text(fragment, tool_id) == text
        assert not page.find("article"), "no card of its own"
        (mark,) = page.find("span", "seq-mark")
        assert mark.attrs["data-at"] == f"toolcall-{tool_id}"


@pytest.mark.parametrize(
    ("status_", "expected"),
    [(AgentSession.Status.WORKING, "running"), (AgentSession.Status.EXITED, "missing")],
)
def test_it_says_running_or_no_result_for_a_call_without_result(
    status_: str, expected: str
) -> None:
    session = make_session(status=status_)
    add_event(session, "agent", call("toolu_q"))
    html = timeline(session)
    assert status(html, "toolu_q") == expected
    assert slot_text(html, "toolu_q") == ""


def test_it_nests_a_subagents_calls_inside_its_task_card() -> None:
    session = make_session()
    add_event(session, "agent", call("toolu_task", "Task", description="Survey", prompt="go"))
    add_event(session, "agent", call("toolu_inner", parent="toolu_task", command="grep -r x"))
    add_event(session, "agent", result("toolu_inner", "found", parent="toolu_task"))
    add_event(session, "agent", result("toolu_task", "survey done"))

    html = timeline(session)
    page = assert_safe(html)
    task_start = html.index('id="toolcall-toolu_task"')
    children = html.index('id="toolchildren-toolu_task"')
    inner = html.index('id="toolcall-toolu_inner"')
    assert task_start < children < inner, "the inner call's card is inside the Task's"
    assert slot_text(html, "toolu_inner") == "found"
    assert slot_text(html, "toolu_task") == "survey done"
    assert "open" in page.find("details", "is-task")[0].attrs
    top = [e for e in parse(html).elements if e.attrs.get("data-seq")]
    assert [e.tag for e in top].count("article") == 2, "the Task's event and the inner turn"


def test_it_nests_a_subagents_calls_live() -> None:
    session = make_session()
    tools = ToolIndex()
    out = []
    for payload in (
        call("toolu_task", "Task", description="Survey", prompt="go"),
        call("toolu_inner", parent="toolu_task"),
        result("toolu_inner", "found", parent="toolu_task"),
    ):
        event = add_event(session, "agent", payload)
        tools.observe(event)
        out.append(render_event_oob(event, tools))
    inner = parse(out[1])
    assert inner.elements[0].attrs["hx-swap-oob"] == "beforeend:#toolchildren-toolu_task"
    assert inner.find("details", "blk-tool")[0].attrs["id"] == "toolcall-toolu_inner"
    marks = inner.find("span", "seq-mark")
    assert marks and "id" not in marks[0].attrs, "the article in the card is the anchor"
    swap = parse(out[2]).elements[0]
    assert swap.attrs["id"] == "toolresult-toolu_inner" and swap.attrs["hx-swap-oob"] == "true"


def test_it_stops_nesting_past_the_depth_limit() -> None:
    session = make_session()
    parent = None
    for level in range(MAX_DEPTH + 2):
        add_event(session, "agent", call(f"toolu_t{level}", "Task", parent=parent, prompt="x"))
        parent = f"toolu_t{level}"
    html = timeline(session)
    assert_safe(html)
    top_articles = [e for e in parse(html).elements if e.tag == "article"]
    assert len(top_articles) == MAX_DEPTH + 2  # all drawn, once each
    assert html.count("<details") - html.count('class="fold"') >= MAX_DEPTH + 2


# -- folding noise ---------------------------------------------------------------------------

NOISE = [
    {"type": "system", "subtype": "thinking_tokens", "tokens": 12},
    {"type": "system", "subtype": "status", "status": "compacting"},
    {"type": "rate_limit_event", "limit": 1},
    {"type": "stream_event", "event": {"type": "content_block_delta"}},
]


def test_it_folds_a_run_of_system_events_into_one_line() -> None:
    session = make_session()
    add_event(session, "dashboard", {"type": "prompt", "text": "go"})
    noise = [add_event(session, "agent", payload) for payload in NOISE]
    add_event(session, "agent", {"type": "assistant", "message": {"content": "answer"}})
    add_event(session, "agent", NOISE[0])

    html = timeline(session)
    page = assert_safe(html)
    folds = page.find("details", "fold")
    assert [f.attrs["id"] for f in folds] == [f"fold-{noise[0].seq}", f"fold-{noise[-1].seq + 2}"]
    assert "open" not in folds[0].attrs
    counts = [e for e in page.elements if "fold-count" in e.classes]
    assert [c.attrs["id"] for c in counts] == [f"{f.attrs['id']}-count" for f in folds]
    shown = "".join(page.text)
    assert "4 system events" in shown and "1 system event" in shown
    # Expanding shows every one of them: nothing dropped.
    ids = {e.attrs.get("id") for e in page.find("article")}
    assert {f"event-{e.seq}" for e in noise} <= ids


def test_it_folds_noise_live_growing_one_fold() -> None:
    session = make_session()
    tools = ToolIndex()
    out = []
    for payload in [*NOISE[:3], {"type": "assistant", "message": {"content": "hi"}}, NOISE[3]]:
        event = add_event(session, "agent", payload)
        tools.observe(event)
        out.append((event, render_event_oob(event, tools)))

    (first, html), (second, html2), (third, html3), (_, answer), (fourth, html5) = out
    assert f'id="fold-{first.seq}"' in html and "1 system event" in html
    assert parse(html2).elements[0].attrs["hx-swap-oob"] == f"beforeend:#fold-{first.seq}-body"
    count = [e for e in parse(html3).elements if e.attrs.get("id") == f"fold-{first.seq}-count"]
    assert count and count[0].attrs["hx-swap-oob"] == "true"
    assert "3 system events" in html3
    assert 'class="fold"' not in answer
    assert f'id="fold-{fourth.seq}"' in html5, "a new run starts a new fold"


@pytest.mark.django_db(transaction=True)  # the export streams from another thread
def test_it_keeps_folded_events_in_the_export(alice: Any) -> None:
    from django.test import Client
    from django.urls import reverse

    session = make_session()
    for payload in NOISE:
        add_event(session, "agent", payload)
    client = Client()
    client.force_login(alice)
    body = content(client.get(reverse("export_jsonl", args=[session.id])))
    assert len(body.decode().strip().splitlines()) == len(NOISE)


# -- the layout as a property: every event drawn exactly once, in order ------------------------

KINDS = st.sampled_from(["call", "task", "result", "noise", "text", "inner", "stderr"])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(KINDS, st.integers(0, 5)), min_size=1, max_size=30))
def test_it_draws_every_event_exactly_once_whatever_the_order(steps: list[tuple[str, int]]) -> None:
    session = make_session()
    for kind, n in steps:
        tool_id = f"toolu_{n}"
        payload: dict | str
        if kind == "call":
            payload = call(tool_id)
        elif kind == "task":
            payload = call(tool_id, "Task", prompt="p")
        elif kind == "inner":
            payload = call(f"toolu_in{n}", parent=tool_id)
        elif kind == "result":
            payload = result(tool_id, f"out {n}")
        elif kind == "noise":
            payload = NOISE[n % len(NOISE)]
        elif kind == "text":
            payload = {"type": "assistant", "message": {"content": f"text {n}"}}
        else:
            add_event(session, "stderr", "log")
            continue
        add_event(session, "agent", payload)
    events = list(session.events.order_by("seq"))
    page = render_timeline(session, events)
    timeline = assert_safe(page.timeline)
    anchors = [
        e.attrs["id"] for e in timeline.elements if e.attrs.get("id", "").startswith("event-")
    ]
    assert sorted(anchors) == sorted(f"event-{e.seq}" for e in events if e.source != "stderr")
    assert len(anchors) == len(set(anchors))
    # The top level lists the seqs it holds in order (the page tells the server the last).
    direct = _top_level_seqs(page.timeline)
    assert direct == sorted(direct) and len(direct) == len(set(direct))
    agent = [e.seq for e in events if e.source != "stderr"]
    if agent:
        assert direct[-1] == agent[-1]
    for event in events:  # and live, every fragment renders and stays inert
        assert_safe(render_event_oob(event, ToolIndex.for_session(session, [event])))


def _top_level_seqs(html: str) -> list[int]:
    """data-seq of #timeline's direct children (what app.js reads)."""
    from html.parser import HTMLParser

    class Top(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.depth = 0
            self.seqs: list[int] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if self.depth == 0 and dict(attrs).get("data-seq"):
                self.seqs.append(int(dict(attrs)["data-seq"] or 0))
            if tag not in {"br", "hr", "img", "input", "meta", "link", "wbr"}:
                self.depth += 1

        def handle_endtag(self, tag: str) -> None:
            self.depth -= 1

    parser = Top()
    parser.feed(html)
    return parser.seqs


def test_it_renders_an_older_page_without_its_calls_as_standalone_results() -> None:
    session = make_session()
    first = add_event(session, "agent", call("toolu_o"))
    answer = add_event(session, "agent", result("toolu_o", "late"))
    fresh = Event.objects.get(pk=answer.pk)
    html = render_event(fresh, ToolIndex.for_session(session, [fresh]))
    page = assert_safe(html)
    assert page.find("details", "blk-result"), "drawn as its own card"
    assert f'href="#event-{first.seq}"' in html
