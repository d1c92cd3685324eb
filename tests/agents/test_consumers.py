"""The session consumer through the real ASGI application (origin check, cookie auth)."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta

import channels.consumer
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.utils import timezone
from prometheus_client import REGISTRY

from dashboard.agents import consumers, fanout, presence, viewers
from dashboard.agents.fanout import hub_for
from dashboard.agents.models import AgentSession, Event, Sandbox, Watcher
from dashboard.agents.recording import NewEvent, live_layer, publish, record, session_group
from dashboard.asgi import application
from tests.agents.helpers import ORIGIN, communicator, cookie_for, wait_for

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


@pytest.mark.parametrize("cookie", [b"sessionid=not-a-session", b"sessionid=", b"other=1"])
async def test_it_refuses_a_socket_whose_cookie_names_no_session(alice, cookie):
    session = await _session()
    viewer = await communicator(f"/ws/sessions/{session.id}/", cookie=cookie)
    connected, _ = await viewer.connect()
    assert not connected


async def test_it_refuses_a_socket_signed_in_before_the_password_changed(alice):
    """The session remembers a hash of the password it was signed in with: once the
    password changes, that session opens no socket (as it opens no page)."""
    session = await _session()
    cookie = await database_sync_to_async(cookie_for)(alice)
    before = await communicator(f"/ws/sessions/{session.id}/", cookie=cookie)
    assert (await before.connect())[0]
    await before.disconnect()

    def change_password() -> None:
        alice.set_password("a new long pass phrase 9")
        alice.save()

    await database_sync_to_async(change_password)()
    after = await communicator(f"/ws/sessions/{session.id}/", cookie=cookie)
    connected, _ = await after.connect()
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


# -- flow control and fan-out ----------------------------------------------------------------


async def _hello(viewer: WebsocketCommunicator, last_seq: int = 0) -> None:
    connected, _ = await viewer.connect()
    assert connected
    await viewer.send_json_to({"last_seq": last_seq})


async def _caught_up(viewer: WebsocketCommunicator) -> None:
    """Until the watchers line, which follows the hello's catch-up."""
    while 'id="watchers"' not in await viewer.receive_from(timeout=5):
        pass


async def _within_a_window_of_ten(user, monkeypatch):  # type: ignore[no-untyped-def]
    """A new session, and `user`'s viewer of it, greeted, with a flow-control window of 10."""
    monkeypatch.setattr(viewers, "WINDOW", 10)
    session = await _session()
    viewer = await _viewer(session, user)
    await _hello(viewer)
    return session, viewer


async def test_it_stops_at_the_window_and_resumes_from_the_database_on_ack(alice, monkeypatch):
    session, viewer = await _within_a_window_of_ten(alice, monkeypatch)
    await _record(session, *range(1, 9))
    assert await _seqs_until(viewer, 8) == list(range(1, 9))
    # The page stops acknowledging: the live batch would pass the window, so it is dropped
    # and the viewer gets from the database only what the window still allows.
    await _record(session, *range(9, 16))
    assert await _seqs_until(viewer, 10) == [9, 10]
    assert await viewer.receive_nothing(timeout=0.2)
    await viewer.send_json_to({"ack": 10})
    assert await _seqs_until(viewer, 15) == list(range(11, 16))
    await viewer.send_json_to({"ack": 15})
    await _record(session, 16)
    assert await _seqs_until(viewer, 16) == [16]
    await viewer.disconnect()


async def test_it_takes_a_pages_acknowledgements_without_a_hop_to_a_thread(alice, monkeypatch):
    """Channels closes stale database connections, in a thread, before every message it
    dispatches; a page's acknowledgements need no database, and hundreds of viewers send
    one a second each."""
    hops: list[str] = []
    hygiene = channels.consumer.aclose_old_connections

    async def counted() -> None:
        hops.append("hop")
        await hygiene()

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)
    session, viewer = await _within_a_window_of_ten(alice, monkeypatch)
    await _record(session, *range(1, 13))
    assert await _seqs_until(viewer, 10) == list(range(1, 11))
    before = len(hops)
    await viewer.send_json_to({"ack": 10})
    assert await _seqs_until(viewer, 12) == [11, 12]  # taken: the window moved on
    assert len(hops) == before
    await viewer.disconnect()
    assert len(hops) == before + 1  # the disconnect is dispatched as before


async def test_it_subscribes_once_per_session_and_shares_one_frame(alice, bob, charlie, members):
    session = await _session()
    watching = [await _viewer(session, user) for user in (alice, bob, charlie)]
    for viewer in watching:
        await _hello(viewer)
        await _caught_up(viewer)
    # One member of the session's group for this worker, not one per viewer.
    assert len(members[session_group(session.id)]) == 1
    feed = hub_for(get_channel_layer(), live_layer()).feeds[str(session.id)]
    assert len(feed.viewers) == 3
    await _record(session, 1, 2)
    frames = []
    for viewer in watching:
        html = await viewer.receive_from(timeout=5)
        while not SEQ.findall(html):
            html = await viewer.receive_from(timeout=5)
        frames.append(html)
    # Joined once and handed to every viewer as the very same string.
    assert frames[0] is frames[1] is frames[2]
    assert feed.batches == 1
    for viewer in watching:
        await viewer.disconnect()
    assert members[session_group(session.id)] == set()
    assert str(session.id) not in hub_for(get_channel_layer(), live_layer()).feeds


async def test_it_announces_watchers_coalesced(alice, monkeypatch):
    monkeypatch.setattr(presence, "INTERVAL", 3600.0)  # no second update within this test
    renders = 0
    real = presence.render_watchers

    def counted(session_id: str) -> dict[str, str]:
        nonlocal renders
        renders += 1
        return real(session_id)

    monkeypatch.setattr(presence, "render_watchers", counted)
    session = await _session()
    watching = [await _viewer(session, alice) for _ in range(12)]
    for viewer in watching:
        await _hello(viewer)
    feed = hub_for(get_channel_layer(), live_layer()).feeds[str(session.id)]
    await wait_for(lambda: _true(feed.presence.updates.runs == 1))
    for viewer in watching:
        await viewer.disconnect()
    # Twelve arrivals and twelve departures: one announcement (the rest wait for the next
    # second); the pages that just opened got the list as last rendered.
    assert feed.presence.updates.runs == 1 and feed.presence.updates.pending
    assert renders <= 2


async def test_it_corrects_a_watcher_list_that_nobody_announced(alice, bob, monkeypatch):
    """A watcher list announcement can be lost (the live layer delivers at most once), and
    the viewers of a worker that died stop counting without one: every `REFRESH` a feed
    counts again and hands out what changed."""
    monkeypatch.setattr(fanout, "REFRESH", 0.1)
    session = await _session()
    viewer = await _viewer(session, alice)
    await _hello(viewer)
    assert "alice" in await _frames_until(viewer, 'id="watchers"')
    # Bob watches from another worker whose announcement never came.
    await Watcher.objects.acreate(channel_name="viewer.elsewhere", session=session, user=bob)
    frames = await _frames_until(viewer, "bob")
    assert "alice" in frames.rsplit('id="watchers"', 1)[1]
    # That worker dies: its row goes stale, and nobody announces the departure.
    stale = timezone.now() - timedelta(seconds=presence.WATCHER_TTL + 1)
    await Watcher.objects.filter(channel_name="viewer.elsewhere").aupdate(seen_at=stale)
    frame = ""
    while 'id="watchers"' not in frame or "bob" in frame:
        frame = await viewer.receive_from(timeout=5)
    assert "alice" in frame
    await viewer.disconnect()


async def _true(value: bool) -> bool:
    return value


async def _frames_until(viewer: WebsocketCommunicator, text: str) -> str:
    """Every frame the viewer receives, joined, until one contains `text`."""
    frames: list[str] = []
    while not frames or text not in frames[-1]:
        frames.append(await viewer.receive_from(timeout=5))
    return "".join(frames)


async def test_it_catches_a_viewer_up_on_what_the_layer_lost(alice, monkeypatch):
    """The live layer delivers at most once: events stored whose message never came (and
    the session's new state with them) still reach the viewer, from the database."""
    monkeypatch.setattr(fanout, "VERIFY_EVERY", 0.05)
    session = await _session()
    viewer = await _viewer(session, alice)
    assert (await viewer.connect())[0]
    await viewer.send_json_to({"last_seq": 0})
    await _record(session, 1)
    assert await _seqs_until(viewer, 1) == [1]
    await viewer.send_json_to({"ack": 1})
    # Stored, and its messages lost on the way: recorded, never published.
    exit_note = NewEvent.ours(Event.Source.BRIDGE, {"type": "exit", "code": 3})
    await database_sync_to_async(record)(session.id, [_text(2), exit_note])
    assert await _seqs_until(viewer, 3) == [2, 3]
    assert "badge-exited" in await _frames_until(viewer, "badge-exited")
    await viewer.disconnect()


async def test_it_catches_viewers_up_only_on_what_did_not_come_by_the_next_look(alice, monkeypatch):
    """An event stored but not yet handed out when the feed looks is not lost; one that
    has still not come by the next look is."""
    turns: asyncio.Queue[None] = asyncio.Queue()
    looked = 0

    async def next_look(seconds: float) -> None:
        nonlocal looked
        looked += 1  # the previous look is over
        await turns.get()

    async def look() -> None:
        before = looked
        turns.put_nowait(None)
        await wait_for(lambda: _true(looked == before + 1))

    catch_ups: list[int] = []
    real = consumers._render_missing

    async def counted(session_id: str, after: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        catch_ups.append(after)
        return await real(session_id, after, *args, **kwargs)

    monkeypatch.setattr(fanout, "_until_next_look", next_look)
    monkeypatch.setattr(consumers, "_render_missing", counted)
    session = await _session()
    viewer = await _viewer(session, alice)
    assert (await viewer.connect())[0]
    await viewer.send_json_to({"last_seq": 0})
    await viewer.receive_from(timeout=5)  # the hello was taken: the state came
    await wait_for(lambda: _true(looked == 1))
    await look()  # nothing stored yet
    _, messages = await database_sync_to_async(record)(session.id, [_text(1)])
    await look()  # stored, its message not yet published: not lost
    await publish(messages)
    assert await _seqs_until(viewer, 1) == [1]
    await look()
    assert catch_ups == []
    await database_sync_to_async(record)(session.id, [_text(2)])  # its message lost
    await look()
    assert catch_ups == []
    await look()  # still not come: the viewer catches up
    assert await _seqs_until(viewer, 2) == [2]
    assert catch_ups == [1]
    await viewer.disconnect()


def _viewers_here() -> float:
    return REGISTRY.get_sample_value("porthole_viewers_here") or 0.0


async def test_it_counts_the_sockets_open_on_this_worker(alice, bob):
    """`porthole_viewers_here` (this process's /metrics): one per open session socket, a
    viewer joining twice counted once, and none left once they have gone."""
    before = _viewers_here()
    first, second = await _session(), await _session_elsewhere()
    pairs = [(first, alice), (first, bob), (second, alice)]
    watching = [await _viewer(session, user) for session, user in pairs]
    for viewer in watching:
        await _hello(viewer)
        await _caught_up(viewer)
    assert _viewers_here() - before == 3
    hub = hub_for(get_channel_layer(), live_layer())
    viewer = next(iter(hub.feeds[str(first.id)].viewers))
    await hub.join(str(first.id), viewer)  # already there
    assert _viewers_here() - before == 3
    for viewer in watching:
        await viewer.disconnect()
    assert _viewers_here() == before


async def test_it_looks_at_every_session_a_worker_follows_in_one_query(alice, monkeypatch):
    """The feeds' check for lost messages is one query a look for the whole worker, not one
    per session: two sessions watched, each look reads both, and each catches its own
    viewer up on what its layer lost."""
    turns: asyncio.Queue[None] = asyncio.Queue()
    looks: list[list[str]] = []
    real = fanout._latest_seqs

    async def next_look(seconds: float) -> None:
        await turns.get()

    async def counted(session_ids: list[str]) -> dict[str, int]:
        looks.append(sorted(session_ids))
        return await real(session_ids)

    async def look() -> None:
        before = len(looks)
        turns.put_nowait(None)
        await wait_for(lambda: _true(len(looks) == before + 1))

    monkeypatch.setattr(fanout, "_until_next_look", next_look)
    monkeypatch.setattr(fanout, "_latest_seqs", counted)
    sessions = [await _session(), await _session_elsewhere()]
    watching = []
    for session in sessions:
        viewer = await _viewer(session, alice)
        assert (await viewer.connect())[0]
        await viewer.send_json_to({"last_seq": 0})
        await viewer.receive_from(timeout=5)  # the hello was taken
        watching.append(viewer)
    for session in sessions:  # stored, their messages lost: recorded, never published
        await database_sync_to_async(record)(session.id, [_text(1)])
    await look()
    await look()
    for viewer in watching:
        assert await _seqs_until(viewer, 1) == [1]
    assert looks == [sorted(str(session.id) for session in sessions)] * 2
    for viewer in watching:
        await viewer.disconnect()
    assert hub_for(get_channel_layer(), live_layer())._verifying is None
