"""Long sessions navigable (issue 11): the session page opened at its start, at any event or
at its first error in one request, as a window of events with older and newer ones loaded
on demand; for team members and share-link holders alike, and never for anyone else."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from dashboard.agents import access, sharing
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering.outline import first_error, outline
from dashboard.agents.views.common import CONTEXT_BEFORE, PAGE_EVENTS
from tests.agents.test_rendering import XSS, Element, add_event, assert_safe, make_session, parse

pytestmark = pytest.mark.django_db


def fill(session: AgentSession, count: int, source: str = "agent") -> None:
    """`count` assistant texts after the session's last event, stored in bulk."""
    first = session.next_seq
    Event.objects.bulk_create(
        Event(
            session=session,
            seq=seq,
            source=source,
            type="stderr" if source == "stderr" else "assistant",
            raw=(
                f"log line {seq}"
                if source == "stderr"
                else json.dumps({"type": "assistant", "message": {"content": f"text {seq}"}})
            ),
        )
        for seq in range(first, first + count)
    )
    session.next_seq = first + count
    session.save(update_fields=["next_seq"])


def long_session(count: int = 650) -> AgentSession:
    session = make_session()
    fill(session, count)
    return session


def member(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def page_of(html: str) -> tuple[Element, list[int]]:
    """The page's root element and the seqs of the events its timeline shows, in order."""
    page = parse(html)
    (root,) = [e for e in page.elements if e.attrs.get("id") == "session-root"]
    seqs = [int(e.attrs["data-seq"]) for e in page.find("article") if "data-seq" in e.attrs]
    return root, seqs


def by_id(html: str, element_id: str) -> Element | None:
    found = [e for e in parse(html).elements if e.attrs.get("id") == element_id]
    return found[0] if found else None


# -- the window ---------------------------------------------------------------------------------


def test_it_opens_a_long_session_at_its_start_in_one_request(alice: User) -> None:
    session = long_session(650)
    response = member(alice).get(reverse("session", args=[session.id]) + "?at=start")
    html = response.content.decode()
    root, seqs = page_of(html)
    assert seqs == list(range(1, PAGE_EVENTS + 1))
    assert root.attrs["data-window"] == "back"
    assert root.attrs["data-through"] == str(PAGE_EVENTS)
    # The live socket's hello claims the tail: newer events are counted, not appended.
    assert root.attrs["data-last-seq"] == "650"
    assert root.attrs["data-target"] == "1"
    slot = by_id(html, "newer-slot")
    assert slot is not None and "data-at-tail" not in slot.attrs
    (button,) = [
        e
        for e in parse(html).find("button")
        if "hx-get" in e.attrs and "newer" in e.attrs["hx-get"]
    ]
    assert button.attrs["hx-get"] == reverse("newer_events", args=[session.id]) + "?after=200"
    notice = by_id(html, "newer-count")
    assert notice is not None and notice.attrs["data-count"] == "450"
    assert "450 newer events" in html
    assert 'hx-get="' + reverse("older_events", args=[session.id]) not in html  # nothing older
    follow = by_id(html, "follow-live")
    assert follow is not None and "checked" not in follow.attrs


def test_it_opens_at_any_event_with_what_led_up_to_it(alice: User) -> None:
    session = long_session(650)
    html = member(alice).get(reverse("session", args=[session.id]) + "?at=300").content.decode()
    root, seqs = page_of(html)
    start = 300 - CONTEXT_BEFORE
    assert seqs == list(range(start, start + PAGE_EVENTS))
    assert root.attrs["data-target"] == "300"
    older = f"{reverse('older_events', args=[session.id])}?before={start}"
    assert older in html
    assert f"?after={start + PAGE_EVENTS - 1}" in html


def test_it_opens_the_latest_page_when_the_event_is_on_it(alice: User) -> None:
    session = long_session(650)
    html = member(alice).get(reverse("session", args=[session.id]) + "?at=640").content.decode()
    root, seqs = page_of(html)
    assert seqs == list(range(451, 651))
    assert root.attrs["data-window"] == "live"
    assert root.attrs["data-last-seq"] == "650" and root.attrs["data-target"] == "640"
    assert by_id(html, "newer-slot") is None and by_id(html, "newer-notice") is None


def test_it_opens_a_short_session_at_its_start_as_the_live_page(alice: User) -> None:
    session = long_session(30)
    html = member(alice).get(reverse("session", args=[session.id]) + "?at=start").content.decode()
    root, seqs = page_of(html)
    assert seqs == list(range(1, 31))
    assert root.attrs["data-window"] == "live" and root.attrs["data-target"] == "1"


@pytest.mark.parametrize("at", ["", "abc", "-5", "1e3", "99999999999999999999999999", "0x10"])
def test_it_takes_any_position_without_failing(alice: User, at: str) -> None:
    session = long_session(250)
    response = member(alice).get(reverse("session", args=[session.id]), {"at": at})
    assert response.status_code == 200
    root, seqs = page_of(response.content.decode())
    assert seqs[-1] == 250 or root.attrs["data-window"] == "back"


def test_it_loads_newer_events_until_the_tail(alice: User) -> None:
    session = long_session(350)
    fill(session, 5, source="stderr")  # 351..355, for the log panel
    client = member(alice)
    url = reverse("newer_events", args=[session.id])
    html = client.get(url, {"after": "100"}).content.decode()
    page = parse(html)
    (appended,) = [e for e in page.elements if e.attrs.get("hx-swap-oob") == "beforeend:#timeline"]
    assert appended.tag == "div"
    _, seqs = page_of('<div id="session-root"></div>' + html)
    assert seqs == list(range(101, 301))
    slot = by_id(html, "newer-slot")
    assert slot is not None and slot.attrs["data-through"] == "300"
    assert "data-at-tail" not in slot.attrs and f"{url}?after=300" in html
    # The last page reaches the tail: the page may go live (reading.js).
    html = client.get(url, {"after": "300"}).content.decode()
    slot = by_id(html, "newer-slot")
    assert slot is not None and slot.attrs["data-through"] == "355"
    assert "data-at-tail" in slot.attrs
    logs = [
        e for e in parse(html).elements if e.attrs.get("hx-swap-oob") == "beforeend:#stderr-log"
    ]
    assert len(logs) == 1 and "log line 355" in html
    # Past the tail: nothing, still at the tail.
    html = client.get(url, {"after": "999999"}).content.decode()
    slot = by_id(html, "newer-slot")
    assert slot is not None and slot.attrs["data-through"] == "999999"
    assert "data-at-tail" in slot.attrs and "beforeend:#timeline" not in html


@pytest.mark.parametrize("after", ["x", "-1", "1" * 40])
def test_it_takes_any_newer_position_without_failing(alice: User, after: str) -> None:
    session = long_session(5)
    response = member(alice).get(reverse("newer_events", args=[session.id]), {"after": after})
    assert response.status_code == 200


def test_it_reads_a_bounded_number_of_rows_wherever_the_window_lies(alice: User) -> None:
    """Opening a window is index ranges and bounded slices: as many queries at the start
    of a 3,000-event session as of a 600-event one, and none reads the whole session."""
    client = member(alice)
    counts = []
    for size in (600, 3_000):
        session = long_session(size)
        client.get(reverse("session", args=[session.id]) + "?at=start")  # warm the caches
        with CaptureQueriesContext(connection) as queries:
            response = client.get(reverse("session", args=[session.id]) + "?at=start")
        assert response.status_code == 200
        events = [q["sql"] for q in queries.captured_queries if '"agents_event"' in q["sql"]]
        assert events and all("LIMIT" in sql for sql in events), events
        counts.append(len(queries.captured_queries))
    assert counts[0] == counts[1]


def test_it_keeps_hostile_content_inert_in_a_window_and_in_newer_pages(alice: User) -> None:
    session = make_session()
    for payload in XSS[:8]:
        add_event(session, "agent", {"type": "assistant", "message": {"content": payload}})
        add_event(session, "agent", {"type": "error", "message": payload})
    fill(session, 400)
    client = member(alice)
    page = client.get(reverse("session", args=[session.id]) + "?at=start").content.decode()
    timeline = page.split('<div id="timeline"', 1)[1].split('<div id="newer-slot"', 1)[0]
    assert "text 1" in timeline and "newer" not in timeline
    assert_safe(timeline)
    newer = client.get(reverse("newer_events", args=[session.id]), {"after": "0"}).content.decode()
    assert "text 1" in newer
    assert_safe(newer.split('hx-swap-oob="beforeend:#timeline">', 1)[1])


# -- the first error ------------------------------------------------------------------------------


def tool_result(is_error: bool, content: str = "output", *, compact: bool = False) -> str:
    block = {"type": "tool_result", "tool_use_id": "t1", "content": content, "is_error": is_error}
    line = {"type": "user", "message": {"content": [block]}}
    return json.dumps(line, separators=(",", ":") if compact else None)


def test_it_finds_the_first_failed_tool_call_before_a_later_error(alice: User) -> None:
    session = long_session(300)
    # A tool's output that merely mentions the marker is no error.
    add_event(session, "agent", tool_result(False, content='{"is_error": true}'))
    fill(session, 10)
    failed = add_event(session, "agent", tool_result(True, compact=True))
    fill(session, 300)
    add_event(session, "agent", {"type": "result", "subtype": "error_during_execution"})
    fill(session, 300)
    assert first_error(session) == failed.seq
    html = member(alice).get(reverse("session", args=[session.id]) + "?at=first-error").content
    root, seqs = page_of(html.decode())
    assert root.attrs["data-target"] == str(failed.seq)
    assert failed.seq - CONTEXT_BEFORE == seqs[0] and root.attrs["data-window"] == "back"


@pytest.mark.parametrize(
    ("source", "payload"),
    [
        ("agent", {"type": "result", "subtype": "error_max_turns", "is_error": True}),
        ("agent", {"type": "result", "subtype": "success", "is_error": True}),
        ("agent", {"type": "error", "message": "API key missing"}),
        ("bridge", {"type": "lost", "reason": "sandbox gone"}),
        ("bridge", {"type": "exit", "code": 137}),
        ("dashboard", {"type": "action_failed", "action": "interrupt", "message": "502"}),
    ],
)
def test_it_finds_each_kind_of_error(source: str, payload: dict[str, Any]) -> None:
    session = long_session(20)
    add_event(session, "bridge", {"type": "exit", "code": 0})  # not an error
    add_event(session, "agent", {"type": "result", "subtype": "success"})  # nor this
    add_event(session, "agent", tool_result(False))
    error = add_event(session, source, payload)
    fill(session, 5)
    assert first_error(session) == error.seq


def test_it_says_so_when_there_is_no_error_and_finds_one_recorded_later(alice: User) -> None:
    session = long_session(250)
    client = member(alice)
    url = reverse("session", args=[session.id]) + "?at=first-error"
    html = client.get(url).content.decode()
    assert "No errors in this session so far." in html
    root, seqs = page_of(html)
    assert seqs[-1] == 250 and root.attrs["data-target"] == ""
    # Only what was recorded since is read, and a new error is found.
    error = add_event(session, "agent", tool_result(True))
    fill(session, 250)
    with CaptureQueriesContext(connection) as queries:
        assert first_error(session) == error.seq
    assert all(f"{250}" in q["sql"] or "LIMIT" in q["sql"] for q in queries.captured_queries)
    html = client.get(url).content.decode()
    assert page_of(html)[0].attrs["data-target"] == str(error.seq)
    with CaptureQueriesContext(connection) as queries:
        assert first_error(session) == error.seq  # once found, never read again
    assert queries.captured_queries == []


def test_it_keeps_the_outline_with_what_was_read_and_reads_only_new_events() -> None:
    session = make_session()
    prompt = add_event(session, "dashboard", {"type": "prompt", "text": "Go"})
    fill(session, 50)
    assert [e.seq for e in outline(session)] == [prompt.seq]
    failed = add_event(session, "dashboard", {"type": "action_failed", "action": "configure"})
    with CaptureQueriesContext(connection) as queries:
        entries = outline(session)
    assert [(e.seq, e.kind, e.label) for e in entries] == [
        (prompt.seq, "prompt", "Go"),
        (failed.seq, "error", "configure failed"),
    ]
    (scan,) = [q["sql"] for q in queries.captured_queries if '"type" IN' in q["sql"]]
    assert f'"seq" > {prompt.seq + 50}' in scan  # only what came after the last look
    with CaptureQueriesContext(connection) as queries:
        outline(session)
    assert len(queries.captured_queries) == 1  # the newest seq, from the index


# -- who may --------------------------------------------------------------------------------------


def test_it_lets_viewers_navigate_and_nobody_without_a_role(bob: User, erin: User) -> None:
    session = long_session(250)
    paths = [
        reverse("session", args=[session.id]) + "?at=start",
        reverse("session", args=[session.id]) + "?at=first-error",
        reverse("newer_events", args=[session.id]) + "?after=10",
    ]
    for path in paths:
        assert member(bob).get(path).status_code == 200
        assert member(erin).get(path).status_code == 403
        anonymous = Client().get(path)
        assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]


def test_it_lets_a_share_link_holder_navigate_within_that_session_only(alice: User) -> None:
    session = long_session(450)
    add_event(session, "dashboard", {"type": "prompt", "text": "secret-plan"}, alice)
    other = long_session(10)
    link, token = access.create_share_link(session, alice, label="", expiry="1d")
    viewer = Client()
    html = viewer.get(f"/share/{token}/?at=start").content.decode()
    root, seqs = page_of(html)
    assert seqs[0] == 1 and root.attrs["data-window"] == "back"
    assert root.attrs["data-latest"] == f"/share/{token}/"
    # Its links stay on the link's pages: newer events, the latest page, the jumps.
    newer = reverse("share_newer", args=[token])
    assert f"{newer}?after=200" in html
    assert f'href="/share/{token}/"' in html and 'href="?at=first-error"' in html
    assert "/sessions/" not in re.sub(r'href="/sessions/[^"]*/events/\d+/raw"', "", html)
    assert "alice" not in html  # the timeline names nobody to a link holder
    more = viewer.get(newer, {"after": "400"})
    assert more.status_code == 200 and "a teammate sent a prompt" in more.content.decode()
    assert viewer.get(f"/share/{token}/?at=first-error").status_code == 200
    # Not the members' URLs, not another session.
    assert viewer.get(reverse("newer_events", args=[session.id]), {"after": "1"}).status_code == 302
    assert viewer.get(reverse("session", args=[other.id]) + "?at=start").status_code == 302
    sharing.revoke([link], alice)
    assert viewer.get(newer, {"after": "1"}).status_code == 404
    assert viewer.get(f"/share/{token}/?at=start").status_code == 404


def test_it_offers_the_jumps_on_every_session_page(alice: User) -> None:
    session = long_session(10)
    html = member(alice).get(reverse("session", args=[session.id])).content.decode()
    links = {e.attrs.get("href") for e in parse(html).find("a")}
    assert {"?at=start", "?at=first-error"} <= links
    # The latest page has no "Latest" link of its own, and takes live events.
    root, _ = page_of(html)
    assert root.attrs["data-window"] == "live" and "porthole-window" in root.attrs["hx-ext"]
