"""The session consumer through the real ASGI application (origin check, cookie auth)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from dashboard.agents.models import AgentSession, Sandbox
from dashboard.agents.recording import NewEvent, publish, record
from dashboard.asgi import application
from tests.agents.helpers import ORIGIN, communicator

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(30)]

SEQ = re.compile(r'id="event-(\d+)"')


async def _viewer(session: AgentSession, user, origin: bytes = ORIGIN):  # type: ignore[no-untyped-def]
    return await communicator(f"/ws/sessions/{session.id}/", user, origin=origin)


@database_sync_to_async
def _session() -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id="sb-test")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-test", title="t")


def _text(n: int) -> NewEvent:
    data = {
        "type": "assistant",
        "message": {"role": "assistant", "content": [{"type": "text", "text": f"line {n}"}]},
        "parent_tool_use_id": None,
    }
    return NewEvent.from_line("agent", json.dumps(data), data)


@database_sync_to_async
def _session_elsewhere() -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id="sb-elsewhere")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-elsewhere", title="x")


async def _record(session: AgentSession, *numbers: int) -> None:
    _, messages = await database_sync_to_async(record)(session.id, [_text(n) for n in numbers])
    await publish(messages)


async def _seqs_until(viewer: WebsocketCommunicator, last: int) -> list[int]:
    """Every event seq the viewer receives, in order, until it has seen `last`."""
    seen: list[int] = []
    while not seen or seen[-1] < last:
        html = await viewer.receive_from(timeout=5)
        seen += [int(s) for s in SEQ.findall(html)]
    return seen


async def test_it_sends_live_fragments_to_a_viewer(alice):
    session = await _session()
    viewer = await _viewer(session, alice)
    connected, _ = await viewer.connect()
    assert connected
    await viewer.send_json_to({"last_seq": 0})
    await _record(session, 1, 2)
    html = await viewer.receive_from(timeout=5)
    while not SEQ.findall(html):  # the header, controls and watchers come first
        html = await viewer.receive_from(timeout=5)
    assert SEQ.findall(html) == ["1", "2"]
    assert "line 2" in html
    assert 'hx-swap-oob="beforeend:#timeline"' in html
    await viewer.disconnect()


async def test_it_replays_exactly_what_a_reconnecting_viewer_missed(alice):
    session = await _session()
    await _record(session, *range(1, 11))
    viewer = await _viewer(session, alice)
    await viewer.connect()
    await viewer.send_json_to({"last_seq": 4})
    assert await _seqs_until(viewer, 10) == list(range(5, 11))
    await _record(session, 11)
    assert await _seqs_until(viewer, 11) == [11]
    await viewer.disconnect()


async def test_it_does_not_send_an_event_twice_when_live_overlaps_replay(alice):
    session = await _session()
    await _record(session, 1, 2, 3)
    viewer = await _viewer(session, alice)
    await viewer.connect()
    await _record(session, 4)  # arrives before the viewer says hello: queued, then deduped
    await viewer.send_json_to({"last_seq": 0})
    await _record(session, 5)
    assert await _seqs_until(viewer, 5) == [1, 2, 3, 4, 5]
    await viewer.disconnect()


async def test_it_gives_two_viewers_identical_streams(alice, charlie):
    session = await _session()
    first, second = await _viewer(session, alice), await _viewer(session, charlie)
    for viewer in (first, second):
        await viewer.connect()
        await viewer.send_json_to({"last_seq": 0})
    await _record(session, 1, 2, 3)
    await _record(session, 4)
    assert await _seqs_until(first, 4) == await _seqs_until(second, 4) == [1, 2, 3, 4]
    await first.disconnect()
    await second.disconnect()


async def test_it_refuses_an_anonymous_viewer(db):
    session = await _session()
    viewer = WebsocketCommunicator(
        application,
        f"/ws/sessions/{session.id}/",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    connected, _ = await viewer.connect()
    assert not connected


async def test_it_refuses_a_foreign_origin(alice):
    session = await _session()
    viewer = await _viewer(session, alice, origin=b"http://evil.example")
    connected, _ = await viewer.connect()
    assert not connected


async def test_it_sends_status_changes_to_the_session_list(alice):
    session = await _session()
    listing = await communicator("/ws/sessions/", alice)
    assert (await listing.connect())[0]
    await listing.send_json_to({"rows": [str(session.id), "not-a-uuid"]})
    current = await listing.receive_from(timeout=5)  # the rows as they are now, at once
    assert f'id="row-{session.id}"' in current and "Starting" in current
    ready = {"type": "ready"}
    other = await _session_elsewhere()
    _, messages = await database_sync_to_async(record)(  # a row the page does not show
        other.id, [NewEvent.from_line("agent", json.dumps(ready), ready)]
    )
    await publish(messages)
    _, messages = await database_sync_to_async(record)(
        session.id, [NewEvent.from_line("agent", json.dumps(ready), ready)]
    )
    await publish(messages)
    html = await listing.receive_from(timeout=5)
    assert "ses-elsewhere" not in html
    assert f'id="row-{session.id}"' in html
    assert 'hx-swap-oob="true"' in html
    assert "Idle" in html
    await listing.disconnect()


async def test_it_stores_a_line_whose_type_is_a_lone_surrogate(db):
    session = await _session()
    raw = '{"type": "\\udfff", "subtype": "x"}'
    data = json.loads(raw)
    appended, _ = await database_sync_to_async(record)(
        session.id, [NewEvent.from_line("agent", raw, data)]
    )
    assert appended.events[0].type == "?"


async def _stalled_viewer(session: AgentSession):  # type: ignore[no-untyped-def]
    """A session consumer on a Twisted transport this test pauses and resumes, as Daphne's
    send buffer would; what it sends is collected as seqs."""
    import functools
    from types import SimpleNamespace

    from twisted.internet.testing import StringTransport

    from dashboard.agents.consumers import SessionConsumer
    from dashboard.daphne_glue import WriteGate

    async def handle_reply(protocol: object, message: dict) -> None:
        return None

    transport = StringTransport()
    consumer = SessionConsumer()
    consumer.session_id, consumer.last_seq, consumer.can_steer = str(session.id), 0, False
    consumer.pending, consumer.overflowed, consumer.draining = [], False, None
    consumer.delivery = asyncio.Lock()
    consumer.gate = WriteGate(functools.partial(handle_reply, SimpleNamespace(transport=transport)))
    sent: list[int] = []

    async def send(text_data: str) -> None:
        sent.extend(int(seq) for seq in SEQ.findall(text_data))

    consumer.send = send  # type: ignore[method-assign]
    return consumer, transport, sent


async def test_it_catches_a_stalled_viewer_up_exactly_once_when_it_drains(db):
    session = await _session()
    consumer, transport, sent = await _stalled_viewer(session)
    _, first = await database_sync_to_async(record)(session.id, [_text(n) for n in range(1, 6)])
    await consumer.session_events(first[0][1])
    assert sent == [1, 2, 3, 4, 5]

    transport.producer.pauseProducing()  # the browser stops reading
    _, later = await database_sync_to_async(record)(session.id, [_text(n) for n in range(6, 31)])
    await consumer.session_events(later[0][1])
    assert sent == [1, 2, 3, 4, 5]  # nothing piles up while it cannot drain
    drain = consumer.draining
    assert drain is not None
    _, live = await database_sync_to_async(record)(session.id, [_text(31)])

    transport.producer.resumeProducing()
    # The drain's catch-up and a live message that skips seqs race for the same events.
    await asyncio.gather(drain, consumer.session_events(live[0][1]))
    assert sent == list(range(1, 32))
