"""What keeps a worker's fan-out cheap: joined frames, no needless queries or thread hops,
presence written in bulk, small per-viewer state. Mechanisms only; speed is in bench/."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dashboard.agents import consumers, fanout
from dashboard.agents.fanout import Feed, hub_for
from dashboard.agents.models import AgentSession, Sandbox, Watcher
from dashboard.agents.presence import Presence
from dashboard.agents.recording import (
    NewEvent,
    live_layer,
    publish,
    record,
    session_group,
    user_group,
)
from dashboard.agents.viewers import Batch, Cursor, StateFrames
from tests.agents.helpers import communicator, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(30)]

SEQ = re.compile(r'id="event-(\d+)"')


@database_sync_to_async
def _session() -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id="sb-fanout")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-fanout", title="f")


def _text(n: int) -> NewEvent:
    data = {
        "type": "assistant",
        "message": {"role": "assistant", "content": [{"type": "text", "text": f"line {n}"}]},
        "parent_tool_use_id": None,
    }
    return NewEvent.from_line("agent", json.dumps(data), data)


async def _record(session: AgentSession, *numbers: int) -> None:
    _, messages = await database_sync_to_async(record)(session.id, [_text(n) for n in numbers])
    await publish(messages)


class Tab:
    """A viewer as the feed sees one: what it was handed, frame by frame."""

    def __init__(self, name: str, link_id: int | None = None) -> None:
        self.channel_name = name
        self.link_id = link_id
        self.frames: list[Batch] = []
        self.states: list[StateFrames] = []

    async def live_events(self, batch: Batch) -> None:
        self.frames.append(batch)

    async def live_state(self, frames: StateFrames) -> None:
        self.states.append(frames)

    async def live_presence(self, watchers: dict[str, str]) -> None:
        return None

    async def missed(self) -> None:
        return None


def _events(first: int, last: int, shared: list[Any] | None = None) -> dict[str, Any]:
    items = [(seq, f"<{seq}>") for seq in range(first, last + 1)]
    return {"type": "session.events", "items": items, "shared": shared}


def _seqs(batch: Batch) -> list[int]:
    return [seq for seq, _ in batch.items]


async def _feed(session: AgentSession, *tabs: Tab) -> Feed:
    feed = Feed(InMemoryChannelLayer(), str(session.id))
    for tab in tabs:
        feed.viewers[tab] = None
    await feed.ready()
    return feed


async def test_it_hands_out_queued_consecutive_batches_as_one_frame(db):
    session = await _session()
    member, holder = Tab("a"), Tab("b", link_id=1)
    feed = await _feed(session, member, holder)
    state = {"type": "session.state", "status": "S", "status_shared": "s", "controls": "C"}
    await feed.dispatch(_events(1, 2), _events(3, 3), _events(4, 5), state, _events(6, 6))
    # Three messages, one frame (and one string for everyone); the state keeps its place.
    assert [_seqs(frame) for frame in member.frames] == [[1, 2, 3, 4, 5], [6]]
    assert member.frames[0] is holder.frames[0]
    assert feed.batches == 2 and len(member.states) == 1
    await feed.stop()


async def test_it_does_not_join_batches_across_a_gap(db):
    session = await _session()
    member = Tab("a")
    feed = await _feed(session, member)
    await feed.dispatch(_events(1, 2), _events(4, 5))  # 3 was lost: the cursor must see it
    assert [_seqs(frame) for frame in member.frames] == [[1, 2], [4, 5]]
    await feed.stop()


async def test_it_does_not_join_after_a_link_holders_batch_was_cut_short(db):
    session = await _session()
    member, holder = Tab("a"), Tab("b", link_id=1)
    feed = await _feed(session, member, holder)
    # Event 2's rendering for link holders failed (None): they stop before it, and must
    # not be handed 3 as if it followed 1.
    await feed.dispatch(_events(1, 2, shared=[(2, None)]), _events(3, 3))
    assert [_seqs(frame) for frame in member.frames] == [[1, 2], [3]]
    assert [_seqs(frame) for frame in holder.frames] == [[1], [3]]
    await feed.stop()


async def test_it_knows_the_last_seq_from_the_database_and_the_stream(db):
    session = await _session()
    await _record(session, 1, 2, 3)
    feed = await _feed(session, Tab("a"))
    assert feed.latest == 3
    await feed.dispatch(_events(4, 6))
    assert feed.latest == 6
    await feed.stop()


async def test_it_asks_the_database_only_for_a_page_that_lacks_something(alice, monkeypatch):
    queries: list[int] = []
    real = consumers._render_missing

    async def counted(session_id: str, after: int, limit: int, *, shared: bool) -> Any:
        queries.append(after)
        return await real(session_id, after, limit, shared=shared)

    monkeypatch.setattr(consumers, "_render_missing", counted)
    session = await _session()
    await _record(session, 1, 2)
    level, behind = (
        await communicator(f"/ws/sessions/{session.id}/", alice),
        await communicator(f"/ws/sessions/{session.id}/", alice),
    )
    for viewer, last_seq in ((level, 2), (behind, 1)):
        assert (await viewer.connect())[0]
        await viewer.send_json_to({"last_seq": last_seq})
        while 'id="watchers"' not in await viewer.receive_from(timeout=5):
            pass
    assert queries == [1]  # only the page that held 1 of 2
    await _record(session, 3)
    for viewer in (level, behind):
        html = await viewer.receive_from(timeout=5)
        while not SEQ.findall(html):
            html = await viewer.receive_from(timeout=5)
        assert SEQ.findall(html) == ["3"]
        await viewer.disconnect()


async def test_it_writes_a_crowd_of_arrivals_and_departures_in_one_query(alice):
    session = await _session()
    announced: list[dict[str, str]] = []

    async def announce(watchers: dict[str, str]) -> None:
        announced.append(watchers)

    presence = Presence(str(session.id), announce)
    presence.updates.interval = 3600.0  # the test flushes by hand
    presence.updates.cancel()
    for n in range(50):
        presence.arrive(f"socket-{n}", alice, None)
    presence.leave("socket-0")  # gone before it was ever written: never written
    await presence.flush()
    count = database_sync_to_async(lambda: Watcher.objects.filter(session=session).count())
    assert presence.writes == 1 and await count() == 49
    for n in range(1, 50):
        presence.leave(f"socket-{n}")
    await presence.flush()
    assert presence.writes == 2 and await count() == 0
    await presence.flush()  # nothing noted: no query
    assert presence.writes == 2


async def test_it_writes_the_last_viewers_departure_when_its_feed_stops(alice):
    session = await _session()
    viewer = await communicator(f"/ws/sessions/{session.id}/", alice)
    assert (await viewer.connect())[0]
    await viewer.send_json_to({"last_seq": 0})
    watchers = database_sync_to_async(lambda: Watcher.objects.filter(session=session).count())
    await wait_for(lambda: _equals(watchers(), 1))
    await viewer.disconnect()
    assert str(session.id) not in hub_for(get_channel_layer(), live_layer()).feeds
    assert await watchers() == 0  # at once, not at the next coalesced update


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


def test_it_keeps_a_viewers_bookkeeping_without_an_instance_dictionary() -> None:
    cursor = Cursor()
    assert not hasattr(cursor, "__dict__")  # slots: a few hundred bytes per open socket
    cursor.hello(0, latest=0)
    assert cursor.fetch() is None and cursor.refresh_state()  # level: only the state


async def test_it_relays_a_revocation_to_a_persons_sockets_through_one_member(alice, members):
    session = await _session()
    layer = get_channel_layer()
    new_channels = 0
    for each in (layer, live_layer()):

        async def counted_new_channel(prefix: str = "specific", real=each.new_channel) -> str:  # type: ignore[no-untyped-def]
            nonlocal new_channels
            new_channels += 1
            return await real(prefix)

        each.new_channel = counted_new_channel
    try:
        tabs = [await communicator(f"/ws/sessions/{session.id}/", alice) for _ in range(3)]
        for tab in tabs:
            assert (await tab.connect())[0]
            await tab.send_json_to({"last_seq": 0})
        # One member of the person's group and one of the session's for this worker, and
        # no channel per socket: two channels in all, whatever the number of tabs.
        assert len(members[user_group(alice.pk)]) == 1
        assert len(members[session_group(session.id)]) == 1
        assert new_channels == 2
        await layer.group_send(user_group(alice.pk), {"type": "user.revoked"})
        for tab in tabs:
            output = await tab.receive_output(timeout=5)
            while output["type"] != "websocket.close":
                output = await tab.receive_output(timeout=5)
            assert output["code"] == 4403
            await tab.disconnect()  # what the browser answers
    finally:
        del layer.new_channel, live_layer().new_channel
    assert members[user_group(alice.pk)] == set()
    assert not hub_for(layer, live_layer()).relays


async def test_it_pauses_after_a_long_hand_out_and_joins_what_came_meanwhile(db, monkeypatch):
    member = Tab("a")
    feed = await _feed(await _session(), member)
    layer = feed.layer
    monkeypatch.setattr(fanout, "PAUSE_AFTER", 0.0)  # every hand-out counts as a long one

    async def pause(seconds: float) -> None:
        if len(member.frames) == 1:  # three more messages arrive during the first pause
            for seq in (2, 3, 4):
                await layer.send(feed.channel, _events(seq, seq))
        for _ in range(5):  # the reader takes them in
            await asyncio.sleep(0)

    monkeypatch.setattr(fanout, "_pause", pause)
    await layer.send(feed.channel, _events(1, 1))
    await wait_for(lambda: _equals(_async(len(member.frames)), 2))
    assert [_seqs(frame) for frame in member.frames] == [[1], [2, 3, 4]]
    assert feed.pauses == 2
    await feed.stop()


async def _feed_taking_6_ms(
    monkeypatch: Any, during_pause: Callable[[Tab], Awaitable[None]] | None = None
) -> tuple[Tab, Feed, list[float], list[float]]:
    """A feed whose every hand-out takes 6 ms of a clock the test turns (`now[0]`), and
    whose pauses are noted (`pauses`) and pass at once on that clock."""
    member = Tab("a")
    feed = await _feed(await _session(), member)
    now = [0.0]
    monkeypatch.setattr(fanout, "_clock", lambda: now[0])
    real_dispatch = feed.dispatch

    async def dispatch_taking_6_ms(*messages: dict[str, Any]) -> None:
        now[0] += 0.006
        await real_dispatch(*messages)

    feed.dispatch = dispatch_taking_6_ms  # type: ignore[method-assign]
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
        if during_pause is not None:
            await during_pause(member)
        now[0] += seconds

    monkeypatch.setattr(fanout, "_pause", pause)
    return member, feed, now, pauses


async def _handed_out(feed: Feed, member: Tab, seq: int, frames: int) -> None:
    """Sends event `seq` to the feed and waits until the member holds `frames` frames."""
    await feed.layer.send(feed.channel, _events(seq, seq))
    await wait_for(lambda: _equals(_async(len(member.frames)), frames))


async def test_it_pauses_when_short_hand_outs_take_most_of_its_time(db, monkeypatch):
    """Hand-outs under PAUSE_AFTER that follow each other closely keep the worker as busy as
    one long one: the feed then pauses as long as a hand-out took, so that what comes
    meanwhile goes out as one frame. Sparse messages go out at once."""
    member, feed, now, pauses = await _feed_taking_6_ms(monkeypatch)
    await _handed_out(feed, member, 1, 1)
    now[0] += 0.100  # the next message comes long after: busy 6 ms of 106
    await _handed_out(feed, member, 2, 2)
    now[0] += 0.004  # busy 6 ms of 10: time enough for the rest of the worker's work
    await _handed_out(feed, member, 3, 3)
    assert pauses == []
    now[0] += 0.001  # and the one after it at once: busy 6 ms of 7
    await _handed_out(feed, member, 4, 4)
    assert pauses == [pytest.approx(0.006)]
    assert feed.pauses == 1
    await feed.stop()


async def test_it_stops_pausing_once_its_hand_outs_leave_it_time_again(db, monkeypatch):
    """A pause is for a worker that hand-outs keep busy: once the hand-out after a pause
    took less than `BUSY_SHARE` of the time since the previous one began, the feed hands
    out as messages come again. (It used to pause after every hand-out for as long as
    anything came during the pause: 300 viewers, 2.8 ms hand-outs every 5 ms, each event
    then waited 3 ms in the inbox.)"""

    async def one_more_comes(member: Tab) -> None:
        if len(member.frames) == 2:
            await _arrives(feed, 3)

    member, feed, now, pauses = await _feed_taking_6_ms(monkeypatch, one_more_comes)
    await _handed_out(feed, member, 1, 1)
    now[0] += 0.001
    await _handed_out(feed, member, 2, 3)  # busy 6 ms of 7: a pause, then what came in it
    assert pauses == [pytest.approx(0.006)]
    assert feed._resuming is None  # 6 ms of 12: no second pause
    now[0] += 0.100
    await _handed_out(feed, member, 4, 4)
    assert [_seqs(frame) for frame in member.frames] == [[1], [2], [3], [4]]
    assert pauses == [pytest.approx(0.006)]
    assert feed.pauses == 1
    await feed.stop()


async def _arrives(feed: Feed, seq: int) -> None:
    """Event `seq` comes while the feed pauses or hands out after a pause, and its reader
    takes it into the inbox."""
    await feed.layer.send(feed.channel, _events(seq, seq))
    for _ in range(5):
        await asyncio.sleep(0)
    assert feed._inbox and _seqs(Batch.of(feed._inbox[-1]["items"])) == [seq]


async def test_it_hands_out_what_came_during_the_hand_out_that_ended_its_pauses(db, monkeypatch):
    """A hand-out may wait (a socket's send, another layer's reader): what came meanwhile
    went to the inbox, and goes out even when that hand-out ends the pauses and nothing
    else comes after it."""

    async def one_more_comes(member: Tab) -> None:
        if len(member.frames) == 2:
            await _arrives(feed, 3)

    member, feed, now, pauses = await _feed_taking_6_ms(monkeypatch, one_more_comes)
    real_dispatch = feed.dispatch

    async def dispatch_meanwhile(*messages: dict[str, Any]) -> None:
        await real_dispatch(*messages)
        if _seqs(member.frames[-1]) == [3]:  # the hand-out after the pause, the last one
            await _arrives(feed, 4)

    feed.dispatch = dispatch_meanwhile  # type: ignore[method-assign]
    await _handed_out(feed, member, 1, 1)
    now[0] += 0.001
    await _handed_out(feed, member, 2, 4)  # busy 6 ms of 7: a pause, 3 in it, 4 during 3's
    assert [_seqs(frame) for frame in member.frames] == [[1], [2], [3], [4]]
    # 4 went out at once after 3 (busy 6 ms of 6: a pause after it, with nothing to follow).
    assert pauses == [pytest.approx(0.006)] * 2
    await feed.stop()


async def test_it_stops_in_a_pause_without_handing_out_what_waits(db, monkeypatch):
    """A feed stopped in a pause (its last viewer left): the pause ends with it, and what
    waited in the inbox is not handed out to anyone after the stop."""
    member = Tab("a")
    feed = await _feed(await _session(), member)
    monkeypatch.setattr(fanout, "PAUSE_AFTER", 0.0)  # every hand-out counts as a long one
    pausing = asyncio.Event()

    async def pause(seconds: float) -> None:
        pausing.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr(fanout, "_pause", pause)
    await _handed_out(feed, member, 1, 1)
    await asyncio.wait_for(pausing.wait(), 5)
    await _arrives(feed, 2)
    resuming = feed._resuming
    assert resuming is not None
    await feed.stop()
    await _settle()
    assert resuming.cancelled()
    assert feed._resuming is None
    assert [_seqs(frame) for frame in member.frames] == [[1]]


async def _settle() -> None:
    for _ in range(200):  # every task that can run, runs
        await asyncio.sleep(0)


@pytest.fixture
def session(db: Any) -> AgentSession:
    return async_to_sync(_session)()


async def _hand_out_at_random(session: AgentSession, rng: random.Random, bursts: int) -> None:
    """Bursts of events to a feed whose hand-outs take 1–12 ms of a turned clock and may
    wait on the loop before and after (a socket's send, the layer), whose pauses may too,
    and which are sometimes let to settle: then every event must be out, once, in order,
    and no pause or inbox left."""
    member = Tab("a")
    feed = await _feed(session, member)
    now = [0.0]
    real_dispatch = feed.dispatch

    async def yields() -> None:
        for _ in range(rng.choice([0, 0, 1, 3])):
            await asyncio.sleep(0)

    async def dispatch(*messages: dict[str, Any]) -> None:
        now[0] += rng.choice([0.001, 0.003, 0.006, 0.012])
        await yields()
        await real_dispatch(*messages)
        await yields()

    async def pause(seconds: float) -> None:
        await yields()
        now[0] += seconds

    feed.dispatch = dispatch  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fanout, "_clock", lambda: now[0])
        patch.setattr(fanout, "_pause", pause)
        seq = 0
        for _ in range(bursts):
            for _ in range(rng.choice([1, 1, 2, 5])):
                seq += 1
                await feed.layer.send(feed.channel, _events(seq, seq))
                await yields()
            now[0] += rng.choice([0.0005, 0.002, 0.005, 0.05])
            if rng.random() < 0.2:
                await _settle()
                assert [n for frame in member.frames for n in _seqs(frame)] == [*range(1, seq + 1)]
                assert feed._resuming is None and feed._inbox == []
        await _settle()
        assert [n for frame in member.frames for n in _seqs(frame)] == [*range(1, seq + 1)]
        await feed.stop()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rng=st.randoms(use_true_random=False), bursts=st.integers(1, 60))
def test_it_hands_out_every_event_once_in_order_however_hand_outs_and_pauses_interleave(
    session: AgentSession, rng: random.Random, bursts: int
) -> None:
    """Hand-outs from the reader, pauses, hand-outs after them and messages that come during
    any of these, in every order the loop may run them. (An earlier version of the pause
    left a message in the inbox, or handed out one before those that came ahead of it.)"""
    async_to_sync(_hand_out_at_random)(session, rng, bursts)


async def _async(value: Any) -> Any:
    return value


async def test_it_renders_the_state_once_for_a_crowd_that_catches_up_at_once(db, monkeypatch):
    """Hundreds of pages opening together each ask the feed for the header and controls
    after catching up: one render from the database for all of them, not one each."""
    session = await _session()
    feed = await _feed(session)
    renders = 0
    real = fanout._current_state

    async def counted(session_id: str) -> dict[str, str] | None:
        nonlocal renders
        renders += 1
        return await real(session_id)

    monkeypatch.setattr(fanout, "_current_state", counted)
    states = await asyncio.gather(*(feed.state() for _ in range(20)))
    assert renders == 1
    assert states[0] is not None and all(state is states[0] for state in states)
    await feed.stop()
