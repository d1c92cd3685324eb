"""Marking a session as handled: for the whole team, recorded in the timeline, and the
"needs attention" rule starts again from it."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from dashboard.agents.export import session_markdown
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import record as record_events
from dashboard.agents.recording import render_state
from dashboard.awareness import attention
from tests.awareness.helpers import agent, new_session, ours, record, result, turn
from tests.awareness.test_attention import later, reasons

pytestmark = pytest.mark.django_db(transaction=True)


def acknowledged(session: AgentSession, actor: User | None = None) -> AgentSession:
    return record(session, ours(Event.Source.DASHBOARD, {"type": "acknowledged"}, actor))


def exited(session: AgentSession, code: int) -> AgentSession:
    return record(session, ours(Event.Source.BRIDGE, {"type": "exit", "code": code}))


def test_it_clears_an_error_a_gap_and_idleness_until_something_new_happens(settings):
    settings.PORTHOLE_ATTENTION_IDLE_MINUTES = 10
    session = record(
        new_session(),
        ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go"}),
        ours(Event.Source.BRIDGE, {"type": "gap", "message": "evicted"}),
        result(subtype="error_during_execution", is_error=True),
        agent({"type": "turn_complete"}),
    )
    assert set(reasons(session, now=later())) == {"error", "gap", "idle"}
    session = acknowledged(session)
    assert reasons(session, now=later()) == ()
    # Something new going wrong needs attention again.
    session = record(session, agent({"type": "error", "message": "rate limited"}))
    assert reasons(session) == ("error",)


@pytest.mark.parametrize(
    ("end", "reason"),
    [({"type": "exit", "code": 3}, "failed"), ({"type": "lost"}, "lost")],
)
def test_it_clears_a_failed_or_lost_ending_marked_after_it(end, reason):
    session = record(turn(new_session()), ours(Event.Source.BRIDGE, end))
    assert reasons(session) == (reason,)
    assert reasons(acknowledged(session)) == ()
    assert not attention.needing_attention().exists()


def test_it_still_flags_an_exit_that_came_after_the_mark():
    """Marked while it ran (an error turn), then the agent exited with an error: that is new."""
    session = turn(new_session(), subtype="error_during_execution", is_error=True)
    session = acknowledged(session)
    assert reasons(session) == ()
    session = exited(session, 2)
    assert reasons(session) == ("failed",)
    assert reasons(acknowledged(session)) == ()


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _failed_session(alice: User) -> AgentSession:
    return exited(turn(new_session(title="Flaky deploy", user=alice)), 3)


def test_it_marks_a_session_as_handled_for_everyone(alice, charlie):
    session = _failed_session(alice)
    page = _client(charlie).get(session.get_absolute_url()).content.decode()
    assert "Needs attention:</strong> the agent exited with an error code." in page
    assert "Mark as handled" in page and "data-can-steer" in page

    url = reverse("session_acknowledge", args=[session.id])
    response = _client(alice).post(url, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert "Marked as handled." in response.content.decode()
    assert response["HX-Trigger"] == '{"porthole:attention-changed": {}}'  # the top bar's count

    mark = Event.objects.get(session=session, type="acknowledged")
    assert (mark.source, mark.actor, json.loads(mark.raw)["reasons"]) == (
        Event.Source.DASHBOARD,
        alice,
        ["failed"],
    )
    assert not attention.needing_attention().exists()
    page = _client(charlie).get(session.get_absolute_url()).content.decode()
    assert "Needs attention" not in page
    assert "alice marked the session as handled" in page
    assert "the agent exited with an error code" in page  # the mark says why
    listed = _client(charlie).get(reverse("index"), {"status": "attention"}).content.decode()
    assert "Flaky deploy" not in listed


def test_it_refuses_to_mark_what_needs_no_attention(alice):
    session = turn(new_session(user=alice))
    response = _client(alice).post(reverse("session_acknowledge", args=[session.id]))
    assert response.status_code == 302  # a plain form post: back to the page, with the message
    response = _client(alice).post(
        reverse("session_acknowledge", args=[session.id]), HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 409
    assert "Nothing here needs attention now." in response.content.decode()
    assert not Event.objects.filter(session=session, type="acknowledged").exists()


def test_it_lets_a_viewer_see_why_but_not_mark_it(alice, bob):
    session = _failed_session(alice)
    page = _client(bob).get(session.get_absolute_url()).content.decode()
    assert "Needs attention:</strong>" in page
    # The note is rendered once for every member watching: a page that may not steer hides
    # its button (awareness.css), and the server refuses the post anyway.
    assert "data-can-steer" not in page
    response = _client(bob).post(reverse("session_acknowledge", args=[session.id]))
    assert response.status_code == 403
    assert attention.needing_attention().filter(pk=session.pk).exists()


def test_it_tells_share_link_holders_nothing_about_attention(alice):
    from dashboard.agents import access

    session = _failed_session(alice)
    _, token = access.create_share_link(session, alice, label="", expiry="1d")
    page = Client().get(f"/share/{token}/").content.decode()
    assert "Needs attention" not in page and "Mark as handled" not in page


def test_it_redraws_every_viewers_header_when_marked(alice):
    """The mark changes none of the session's fields, yet the header must lose its note on
    every page following the session: recording it announces the state too."""
    session = _failed_session(alice)
    assert "attention-note" in render_state(session)["status"]
    mark = ours(Event.Source.DASHBOARD, {"type": "acknowledged", "reasons": ["failed"]}, alice)
    _, messages = record_events(session.id, [mark])
    states = [m for _, m in messages if m["type"] == "session.state"]
    assert len(states) == 1
    assert "attention-note" not in states[0]["status"]
    rows = [m for _, m in messages if m["type"] == "sessions.row"]
    assert len(rows) == 1 and "needs attention" not in rows[0]["html"]


@pytest.mark.parametrize(
    "reasons_field", [["failed", "idle"], "failed", [["failed"]], [{"x": 1}], None, [1, "lost"]]
)
def test_it_shows_a_mark_whatever_its_reasons_field_holds(alice, reasons_field):
    session = _failed_session(alice)
    data = {"type": "acknowledged", "reasons": reasons_field}
    record(session, ours(Event.Source.DASHBOARD, data, alice))
    page = _client(alice).get(session.get_absolute_url()).content.decode()
    assert "alice marked the session as handled" in page


def test_it_puts_the_mark_in_the_markdown_export(alice, charlie):
    session = _failed_session(alice)
    _client(charlie).post(reverse("session_acknowledge", args=[session.id]), HTTP_HX_REQUEST="true")
    text = session_markdown(session, session.events.all())
    assert "*charlie marked the session as handled* (the agent exited with an error code)." in text


# -- from the list: triage without opening each session ------------------------------------


def _row_form(page: str, session: AgentSession) -> str:
    """The list row's mark form for `session`, or "" when the row has none."""
    row = page.split(f'id="row-{session.id}"', 1)[1].split("</tr>", 1)[0]
    return row.split('class="ack-form', 1)[1].split("</form>", 1)[0] if "ack-form" in row else ""


def test_it_offers_the_mark_in_the_list_where_something_needs_attention(alice, bob):
    failed = _failed_session(alice)
    fine = turn(new_session(title="All good", user=alice))
    page = _client(alice).get(reverse("index"), {"status": "all"}).content.decode()
    form = _row_form(page, failed)
    assert reverse("session_acknowledge", args=[failed.id]) in form
    assert f'hx-target="#row-{failed.id}"' in form and 'name="from" value="list"' in form
    assert 'name="csrfmiddlewaretoken"' in form  # the form works without JavaScript too
    assert _row_form(page, fine) == ""
    assert 'id="session-list-root" data-can-steer' in page
    # Rows are rendered once for everyone watching the list: a viewer's page hides the button
    # (awareness.css), and the server refuses the post anyway.
    page = _client(bob).get(reverse("index")).content.decode()
    assert "data-can-steer" not in page


def test_it_marks_from_the_list_and_answers_with_the_row(alice, charlie):
    session = _failed_session(alice)
    url = reverse("session_acknowledge", args=[session.id])
    target = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": f"row-{session.id}"}
    response = _client(charlie).post(url, {"from": "list"}, **target)
    assert response.status_code == 200
    row = response.content.decode()
    assert row.lstrip().startswith(f'<tr id="row-{session.id}"') and "hx-swap-oob" not in row
    assert "Flaky deploy" in row and "needs attention" not in row and "ack-form" not in row
    assert response["HX-Trigger"] == '{"porthole:attention-changed": {}}'
    mark = Event.objects.get(session=session, type="acknowledged")
    assert (mark.actor, json.loads(mark.raw)["reasons"]) == (charlie, ["failed"])

    # Someone else was quicker (two people triaging the same list): the row, as it is now,
    # and nothing recorded twice.
    response = _client(alice).post(url, {"from": "list"}, **target)
    assert response.status_code == 200
    assert f'id="row-{session.id}"' in response.content.decode()
    assert Event.objects.filter(session=session, type="acknowledged").count() == 1


def test_it_brings_a_plain_form_post_back_to_the_list_it_came_from(alice):
    session = _failed_session(alice)
    url = reverse("session_acknowledge", args=[session.id])
    came_from = "http://testserver/?status=all&q=deploy"
    client = _client(alice)
    response = client.post(url, {"from": "list"}, HTTP_REFERER=came_from)
    assert (response.status_code, response["Location"]) == (302, came_from)
    assert "HX-Trigger" not in response  # the page it lands on polls the count afresh
    assert not attention.needing_attention().exists()
    listed = client.get(came_from).content.decode()
    assert "Marked “Flaky deploy” as handled." in listed
    # Never sent elsewhere: a referrer on another host brings the list back instead.
    session = _failed_session(alice)
    response = client.post(
        reverse("session_acknowledge", args=[session.id]),
        {"from": "list"},
        HTTP_REFERER="https://evil.example/phish",
    )
    assert (response.status_code, response["Location"]) == (302, reverse("index"))


def test_it_refuses_a_viewers_mark_from_the_list(alice, bob):
    session = _failed_session(alice)
    response = _client(bob).post(
        reverse("session_acknowledge", args=[session.id]),
        {"from": "list"},
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET=f"row-{session.id}",
    )
    assert response.status_code == 403
    assert attention.needing_attention().filter(pk=session.pk).exists()


def test_it_marks_every_session_the_attention_list_shows_at_once(alice, charlie):
    failed = [_failed_session(alice) for _ in range(3)]
    fine = turn(new_session(title="All good", user=alice))
    client = _client(charlie)
    came_from = "http://testserver/?status=attention"
    page = client.get(came_from).content.decode()
    form = page.split('class="bulk-ack"', 1)[1].split("</form>", 1)[0]
    assert reverse("sessions_acknowledge") in form and "Mark all 3 shown as handled" in form
    shown = re.findall(r'name="session" value="([0-9a-f-]{36})"', form)
    assert sorted(shown) == sorted(str(s.id) for s in failed)

    # What the page showed, and what changed since or was never there: only sessions that
    # still need attention are marked.
    posted = [*shown, str(fine.id), "not-a-uuid", "00000000-0000-0000-0000-000000000000"]
    response = client.post(
        reverse("sessions_acknowledge"), {"session": posted}, HTTP_REFERER=came_from
    )
    assert (response.status_code, response["Location"]) == (302, came_from)
    marks = Event.objects.filter(type="acknowledged")
    assert sorted(str(m.session_id) for m in marks) == sorted(shown)
    assert {m.actor for m in marks} == {charlie}
    assert not attention.needing_attention().exists()
    page = client.get(came_from).content.decode()
    assert "Marked 3 sessions as handled." in page and 'class="bulk-ack"' not in page


def test_it_refreshes_the_list_after_marking_many_with_htmx(alice):
    session = _failed_session(alice)
    response = _client(alice).post(
        reverse("sessions_acknowledge"), {"session": [str(session.id)]}, HTTP_HX_REQUEST="true"
    )
    assert (response.status_code, response["HX-Refresh"]) == (200, "true")
    assert Event.objects.filter(session=session, type="acknowledged").count() == 1


def test_it_offers_marking_many_only_where_it_may_be_done(alice, bob):
    _failed_session(alice)
    assert 'class="bulk-ack"' not in _client(alice).get(reverse("index")).content.decode()
    viewer = _client(bob)
    assert 'class="bulk-ack"' not in viewer.get("/?status=attention").content.decode()
    session = _failed_session(alice)
    response = viewer.post(reverse("sessions_acknowledge"), {"session": [str(session.id)]})
    assert response.status_code == 403
    assert not Event.objects.filter(type="acknowledged").exists()


def test_it_refuses_to_mark_more_than_a_page_of_sessions_at_once(alice):
    session = _failed_session(alice)
    many = [str(session.id)] * 101
    response = _client(alice).post(reverse("sessions_acknowledge"), {"session": many})
    assert response.status_code == 400
    assert not Event.objects.filter(type="acknowledged").exists()
