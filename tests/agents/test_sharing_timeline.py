"""A share link's timeline names nobody: Porthole's own events (a prompt sent, an interrupt, a
kill) say "a teammate" to a link holder, on page load, in older pages and live, while team
members keep seeing who did it."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client

from dashboard.agents import access, actions
from dashboard.agents.fanout import _for_link_holders
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.recording import NewEvent, record_and_publish
from dashboard.agents.viewers import Batch
from tests.agents.helpers import communicator

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

# What alice does to the session, as the dashboard records it.
ACTIONS = [
    {"type": "prompt", "text": "look at the logs"},
    {"type": "interrupt"},
    {"type": "kill", "signal": "9"},
]


def _session() -> AgentSession:
    """Started by nobody, so that only the timeline could name alice."""
    sandbox = Sandbox.objects.create(upstream_id="sb-timeline")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-t", title="Named work")


def _acted_on_by(user: User) -> tuple[AgentSession, str]:
    session = _session()
    agent_line = '{"type":"assistant","message":{"content":[{"type":"text","text":"hi"}]}}'
    events = [NewEvent.from_line(Event.Source.AGENT, agent_line, None)]
    events += [NewEvent.ours(Event.Source.DASHBOARD, data, actor_id=user.pk) for data in ACTIONS]
    record_and_publish(session.id, events)
    _, token = access.create_share_link(session, user, label="", expiry="1d")
    return session, token


def _member(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_shows_a_link_holder_no_actors_name_on_the_page(oc, alice):
    session, token = _acted_on_by(alice)
    shared = Client().get(f"/share/{token}/").content.decode()
    assert "a teammate sent a prompt" in shared
    assert "a teammate interrupted" in shared
    assert "a teammate killed the session" in shared
    assert "alice" not in shared
    member = _member(alice).get(session.get_absolute_url()).content.decode()
    assert "alice sent a prompt" in member
    assert "alice killed the session" in member


def test_it_shows_a_link_holder_no_actors_name_in_older_events(oc, alice):
    session, token = _acted_on_by(alice)
    shared = Client().get(f"/share/{token}/older/?before=100").content.decode()
    assert "a teammate interrupted" in shared
    assert "alice" not in shared
    url = f"/sessions/{session.id}/older/?before=100"
    assert "alice interrupted" in _member(alice).get(url).content.decode()


def test_it_gives_a_link_holder_raw_payloads_without_names(oc, alice):
    session, token = _acted_on_by(alice)
    holder = Client()
    assert holder.get(f"/share/{token}/").status_code == 200
    for seq in range(1, 5):
        response = holder.get(f"/sessions/{session.id}/events/{seq}/raw")
        assert response.status_code == 200
        assert b"alice" not in response.content


async def _until(socket: WebsocketCommunicator, text: str) -> str:
    received = ""
    while text not in received:
        received += await socket.receive_from(timeout=10)
    return received


async def test_it_sends_a_link_holder_no_actors_name_live(oc, alice, bob):
    session = await database_sync_to_async(_session)()
    _, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="1d"
    )
    member = await communicator(f"/ws/sessions/{session.id}/", bob)
    outsider = await communicator(f"/ws/share/{token}/")
    for socket in (member, outsider):
        assert (await socket.connect())[0]
        await socket.send_json_to({"last_seq": 0})
    for socket in (member, outsider):
        await _until(socket, "link viewer")  # caught up: what follows comes live
    await actions.note(session.id, ACTIONS[0], alice)
    await actions.note(session.id, ACTIONS[1], alice)
    await actions.note(session.id, ACTIONS[2], alice)
    seen_by_member = await _until(member, "alice killed the session")
    assert "alice sent a prompt" in seen_by_member
    seen_by_outsider = await _until(outsider, "a teammate killed the session")
    assert "a teammate sent a prompt" in seen_by_outsider
    assert "a teammate interrupted" in seen_by_outsider
    assert "alice" not in seen_by_outsider
    for socket in (member, outsider):
        await socket.disconnect()


def test_it_shares_the_agents_fragments_and_stops_before_a_holders_failed_one() -> None:
    batch = Batch(((1, "agent"), (2, "alice sent a prompt"), (3, "agent again")))
    shared = _for_link_holders(batch, [[2, "a teammate sent a prompt"]])
    assert shared.items == ((1, "agent"), (2, "a teammate sent a prompt"), (3, "agent again"))
    assert shared.items[0][1] is batch.items[0][1]
    assert _for_link_holders(batch, None) is batch
    # Never the member's version: the holder catches up from the database instead.
    assert _for_link_holders(batch, [[2, None]]).items == ((1, "agent"),)
