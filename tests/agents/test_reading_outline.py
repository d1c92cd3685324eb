"""The session page's outline (issue 12): each prompt, each turn's result, each error and
each gap, linking to the event; grown live; and the follow-live toggle's wiring."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from dashboard.agents.rendering import ToolIndex, render_event_oob
from dashboard.agents.rendering.outline import outline
from tests.agents.test_rendering import XSS, add_event, assert_safe, make_session, parse

pytestmark = pytest.mark.django_db


def test_it_outlines_prompts_results_errors_and_gaps_in_order(alice: User) -> None:
    session = make_session()
    prompt = add_event(
        session, "dashboard", {"type": "prompt", "text": "Add validation\nplease"}, alice
    )
    add_event(session, "agent", {"type": "assistant", "message": {"content": "working"}})
    ok = add_event(
        session, "agent", {"type": "result", "subtype": "success", "total_cost_usd": 0.0123}
    )
    gap = add_event(session, "bridge", {"type": "gap", "lost_bytes": 10})
    error = add_event(session, "agent", {"type": "error", "message": "API key missing"})
    failed = add_event(
        session, "agent", {"type": "result", "subtype": "error_max_turns", "is_error": True}
    )
    add_event(session, "bridge", {"type": "exit", "code": 0})
    crash = add_event(session, "bridge", {"type": "exit", "code": 137})

    entries = outline(session)
    assert [(e.seq, e.kind) for e in entries] == [
        (prompt.seq, "prompt"),
        (ok.seq, "result"),
        (gap.seq, "gap"),
        (error.seq, "error"),
        (failed.seq, "error"),
        (crash.seq, "error"),
    ]
    assert entries[0].label == "Add validation"
    assert entries[1].label == "success · $0.0123"

    client = Client()
    client.force_login(alice)
    html = client.get(reverse("session", args=[session.id])).content.decode()
    page = parse(html)
    (listing,) = [e for e in page.elements if e.attrs.get("id") == "outline-list"]
    links = [e.attrs["href"] for e in page.find("a") if e.attrs.get("data-jump")]
    assert links == [f"?at={e.seq}#event-{e.seq}" for e in entries]
    assert listing.tag == "ol"


def _tool_result(text: str, *, failed: bool) -> dict[str, object]:
    block = {"type": "tool_result", "tool_use_id": "toolu_1", "content": text}
    return {"type": "user", "message": {"content": [{**block, "is_error": failed}]}}


def test_it_outlines_a_failed_tool_call_as_an_error() -> None:
    """The README's "each error" includes a failed tool call (First error jumps to one): in
    the outline as the page draws it, and live, with the first line of what it said."""
    session = make_session()
    add_event(session, "agent", _tool_result("fine", failed=False))
    failed = add_event(
        session, "agent", _tool_result("ls: /missing: No such file\nmore", failed=True)
    )
    huge = add_event(session, "agent", _tool_result("x" * 30_000, failed=True))
    assert [(e.seq, e.kind, e.label) for e in outline(session)] == [
        (failed.seq, "error", "tool call failed: ls: /missing: No such file"),
        (huge.seq, "error", "tool call failed"),
    ]
    html = render_event_oob(failed, ToolIndex())
    assert "beforeend:#outline-list" in html and "tool call failed" in html


def test_it_grows_the_outline_live() -> None:
    session = make_session()
    tools = ToolIndex()
    result = add_event(session, "agent", {"type": "result", "subtype": "success"})
    html = render_event_oob(result, tools)
    swaps = [
        e for e in parse(html).elements if e.attrs.get("hx-swap-oob") == "beforeend:#outline-list"
    ]
    assert len(swaps) == 1
    assert f'href="?at={result.seq}#event-{result.seq}"' in html
    text = add_event(session, "agent", {"type": "assistant", "message": {"content": "hi"}})
    assert "outline-list" not in render_event_oob(text, tools)


@pytest.mark.parametrize("payload", XSS[:8])
def test_it_keeps_hostile_labels_inert(payload: str) -> None:
    session = make_session()
    add_event(session, "agent", {"type": "error", "message": payload})
    event = add_event(session, "dashboard", {"type": "prompt", "text": payload})
    assert_safe(render_event_oob(event, ToolIndex()))
    assert [e.kind for e in outline(session)] == ["error", "prompt"]


def test_it_does_not_parse_huge_lines_for_the_outline() -> None:
    session = make_session()
    add_event(session, "agent", {"type": "error", "message": "x" * 100_000})
    (entry,) = outline(session)
    assert entry.label == "agent error"


def test_it_loads_the_reading_script_with_the_nonce_and_offers_follow_live(alice: User) -> None:
    session = make_session()
    client = Client()
    client.force_login(alice)
    response = client.get(reverse("session", args=[session.id]))
    html = response.content.decode()
    script = re.search(r'<script src="[^"]*reading\.js" nonce="([^"]+)"', html)
    assert script and script.group(1) in response.headers.get("Content-Security-Policy", "")
    assert re.search(r'<link rel="stylesheet" href="[^"]*highlight\.css"', html)
    box = [e for e in parse(html).elements if e.attrs.get("id") == "follow-live"]
    assert box and "checked" in box[0].attrs


def test_it_outlines_no_further_than_the_page_holds(alice: User, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An event recorded while the page renders comes live, with its outline entry, after the
    page's last seq: had the outline read it as well, the page would list it twice."""
    from dashboard.agents.views import common

    session = make_session()
    first = add_event(session, "agent", {"type": "error", "message": "first"})
    draw = common._timeline
    recorded = []

    def recording_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not recorded:
            recorded.append(add_event(session, "bridge", {"type": "exit", "code": 4}))
        return draw(*args, **kwargs)

    monkeypatch.setattr(common, "_timeline", recording_meanwhile)
    client = Client()
    client.force_login(alice)
    html = client.get(reverse("session", args=[session.id])).content.decode()
    held = int(re.search(r'data-last-seq="(\d+)"', html).group(1))  # type: ignore[union-attr]
    assert held == first.seq < recorded[0].seq
    jumps = [int(seq) for seq in re.findall(r'data-jump="(\d+)"', html)]
    assert jumps == [first.seq]
    # The outline itself (cached up to the newest event now) still answers each page as of
    # its own last seq.
    assert [e.seq for e in outline(session)] == [first.seq, recorded[0].seq]
    assert [e.seq for e in outline(session, through=first.seq)] == [first.seq]
