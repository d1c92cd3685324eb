"""A bridge that falls behind stores first and draws after (issue 11): the record keeps up
with the sandbox, and every viewer still gets every event once, in order, each drawn once
and kept with its row.

The bridges here record from their queue (no upstream) against the real database, as in
test_bridge_indexing; what they announce is caught where it leaves for the channel layer.
One test runs a whole bridge against the embedded sandbox server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import threading
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync
from channels.db import database_sync_to_async
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.agents import bridge as bridge_module
from dashboard.agents import recording
from dashboard.agents.bridge import RECORD_SLICE, Bridge, Undrawn, _tool_index
from dashboard.agents.fanout import _stored_seqs
from dashboard.agents.leases import Lease
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import (
    Message,
    NewEvent,
    record_and_publish,
    render_state,
    store,
)
from dashboard.agents.rendering import ToolIndex
from dashboard.agents.supervisor import BridgeSupervisor
from dashboard.opencomputer import OpenComputer
from dashboard.search.index import index_tail
from dashboard.search.models import SearchEntry
from tests.agents.helpers import held_session, said

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

OWNER = "drawing-worker"

_new_session = functools.partial(
    held_session, "sb-drawing", "ses-drawing", owner=OWNER, lease_seconds=60
)


def _exit_note() -> NewEvent:
    return NewEvent.ours(Event.Source.BRIDGE, {"type": "exit", "code": 0})


def _announced(monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """What the bridges (and views) send to the channel layers, in the order sent."""
    sent: list[Message] = []

    async def publish(messages: Any) -> None:
        sent.extend(messages)

    monkeypatch.setattr(bridge_module, "publish", publish)
    monkeypatch.setattr(recording, "publish", publish)
    return sent


def _event_seqs(sent: list[Message]) -> list[int]:
    return [
        seq
        for _, message in sent
        if message["type"] == "session.events"
        for seq, _ in message["items"]
    ]


def _steps(monkeypatch: pytest.MonkeyPatch, bridge: Bridge | None = None) -> list[tuple[str, int]]:
    """Each store (its last seq) and each draw (its last seq) the bridge makes, in order;
    and, given the bridge, the most rows it kept for drawing at any time."""
    steps: list[tuple[str, int]] = []
    stored, drawn = bridge_module._store, bridge_module._draw_stored

    async def storing(events: list[NewEvent], lease: Lease) -> Any:
        rows, messages = await stored(events, lease)
        steps.append(("store", rows[-1].seq))
        return rows, messages

    async def drawing(first: int, last: int, *args: Any) -> Any:
        if bridge is not None:
            steps.append(("kept", len(bridge._undrawn.rows)))
        result = await drawn(first, last, *args)
        steps.append(("draw", last))
        return result

    monkeypatch.setattr(bridge_module, "_store", storing)
    monkeypatch.setattr(bridge_module, "_draw_stored", drawing)
    return steps


async def _record_from_queue(bridge: Bridge, batches: list[list[NewEvent]]) -> None:
    """The bridge's recorder alone, with `batches` already waiting, then the end; it starts
    from what the database says was left undrawn, as `Bridge.run` does."""
    bridge.lease = Lease(bridge.session_id, OWNER, None)
    async with ThreadSensitiveContext():
        bridge._tools = await _tool_index(bridge.session_id)
        session = await database_sync_to_async(AgentSession.objects.get)(id=bridge.session_id)
        bridge._undrawn = Undrawn.of(session)
        for batch in batches:
            bridge._hand_over(batch)
        bridge._queue.put_nowait(None)
        await bridge._record_loop()


@database_sync_to_async
def _rows(session: AgentSession) -> list[tuple[int, str | None]]:
    return list(Event.objects.filter(session=session).order_by("seq").values_list("seq", "html"))


@database_sync_to_async
def _session(session: AgentSession) -> AgentSession:
    return AgentSession.objects.get(id=session.id)


def _flood(batches: int, size: int = RECORD_SLICE) -> list[list[NewEvent]]:
    return [[said(f"flood {b}-{n}") for n in range(size)] for b in range(batches)]


async def test_it_stores_what_waits_before_drawing_it(monkeypatch):
    """With no share of its time for drawing while events wait, a bridge stores a whole
    backlog first (in slices larger than a paced record's), then draws it in order: every
    event announced once, its element kept with its row, the state last."""
    monkeypatch.setattr(bridge_module, "DRAW_SHARE", 0.0)
    sent = _announced(monkeypatch)
    steps = _steps(monkeypatch)
    session = await _new_session()
    batches = _flood(6)
    batches[-1].append(_exit_note())

    await _record_from_queue(Bridge(str(session.id), OWNER), batches)

    last = 6 * RECORD_SLICE + 1
    kinds = [kind for kind, _ in steps]
    assert kinds.index("draw") > max(i for i, kind in enumerate(kinds) if kind == "store")
    stores = [seq for kind, seq in steps if kind == "store"]
    assert stores[-1] == last and len(stores) < 6  # larger slices than RECORD_SLICE
    assert _event_seqs(sent) == list(range(1, last + 1))
    assert [message["type"] for _, message in sent][-2:] == ["session.state", "sessions.row"]
    rows = await _rows(session)
    assert [seq for seq, _ in rows] == list(range(1, last + 1))
    assert all(html for seq, html in rows if seq < last)  # every text drawn and kept
    stored = await _session(session)
    assert stored.undrawn_from is None and stored.status == AgentSession.Status.EXITED


async def test_it_tells_viewers_how_far_behind_the_page_is_until_it_has_caught_up(monkeypatch):
    """While a backlog is drawn, the state announced says how many recorded events are
    still to come (at once, then at most every two seconds); once drawn, a state without it."""
    monkeypatch.setattr(bridge_module, "DRAW_SHARE", 0.0)
    sent = _announced(monkeypatch)
    session = await _new_session()

    await _record_from_queue(Bridge(str(session.id), OWNER), _flood(6))

    notes = [
        re.search(r'class="behind">(\d+) more events recorded', message["status"])
        for _, message in sent
        if message["type"] == "session.state"
    ]
    assert notes[0] is not None and int(notes[0][1]) == 6 * RECORD_SLICE - RECORD_SLICE
    assert notes[-1] is None  # caught up: the note is gone
    told = [i for i, (_, m) in enumerate(sent) if m["type"] == "session.state"]
    assert _event_seqs(sent[: told[0]]) == list(range(1, RECORD_SLICE + 1))  # after a slice


async def test_it_draws_within_its_share_while_a_flood_is_stored(monkeypatch):
    """Viewers are not left with nothing until a flood ends: a slice is drawn between
    stores, as the share allows."""
    monkeypatch.setattr(bridge_module, "DRAW_SHARE", 0.5)
    monkeypatch.setattr(bridge_module, "STORE_SLICE", RECORD_SLICE)
    sent = _announced(monkeypatch)
    steps = _steps(monkeypatch)
    session = await _new_session()

    await _record_from_queue(Bridge(str(session.id), OWNER), _flood(5))

    kinds = [kind for kind, _ in steps]
    last_store = max(i for i, kind in enumerate(kinds) if kind == "store")
    assert "draw" in kinds[:last_store]
    assert _event_seqs(sent) == list(range(1, 5 * RECORD_SLICE + 1))


async def test_it_draws_as_it_stores_when_nothing_waits(monkeypatch):
    """A paced session (one batch at a time, nothing behind it) is drawn in the transaction
    that stores it, as before: no second write, nothing left undrawn."""
    sent = _announced(monkeypatch)
    steps = _steps(monkeypatch)
    session = await _new_session()
    bridge = Bridge(str(session.id), OWNER)
    bridge.lease = Lease(bridge.session_id, OWNER, None)
    async with ThreadSensitiveContext():
        bridge._tools = await _tool_index(bridge.session_id)
        recorder = asyncio.create_task(bridge._record_loop())
        for n in range(3):
            bridge._hand_over([said(f"paced {n}")])
            while _event_seqs(sent) != list(range(1, n + 2)):
                await asyncio.sleep(0.01)
        bridge._queue.put_nowait(None)
        await asyncio.wait_for(recorder, 20)
    assert steps == []
    assert all(html for _, html in await _rows(session))


async def test_it_draws_a_brief_queue_as_it_stores_it(monkeypatch):
    """A few events waiting behind one being recorded (a loaded worker, a paced session)
    are no flood: storing them first would only add a transaction."""
    monkeypatch.setattr(bridge_module, "DRAW_SHARE", 0.0)
    sent = _announced(monkeypatch)
    steps = _steps(monkeypatch)
    session = await _new_session()

    await _record_from_queue(
        Bridge(str(session.id), OWNER), [[said(f"brief {n}")] for n in range(5)]
    )

    assert steps == []
    assert _event_seqs(sent) == [1, 2, 3, 4, 5]


async def test_it_reads_back_what_it_could_not_keep(monkeypatch):
    """Rows stored and not drawn are kept up to `DRAW_AHEAD`; the drawer reads the rest back
    and draws them alike."""
    monkeypatch.setattr(bridge_module, "DRAW_SHARE", 0.0)
    monkeypatch.setattr(bridge_module, "DRAW_AHEAD", 50)
    monkeypatch.setattr(bridge_module, "STORE_SLICE", RECORD_SLICE)
    sent = _announced(monkeypatch)
    bridge = Bridge(str((await _new_session()).id), OWNER)
    steps = _steps(monkeypatch, bridge)

    await _record_from_queue(bridge, _flood(4))

    assert max(count for kind, count in steps if kind == "kept") == 50
    assert _event_seqs(sent) == list(range(1, 4 * RECORD_SLICE + 1))
    rows = await _rows(await _session_of(bridge))
    items = {
        seq: html for _, m in sent if m["type"] == "session.events" for seq, html in m["items"]
    }
    # A row read back (seq 51 on) is drawn as one kept (its fragment holds its element).
    assert all(html and html in items[seq] for seq, html in rows)


@database_sync_to_async
def _session_of(bridge: Bridge) -> AgentSession:
    return AgentSession.objects.get(id=bridge.session_id)


@database_sync_to_async
def _stored_undrawn(session: AgentSession, texts: list[str]) -> list[int]:
    """Stored as a bridge that fell behind stores, and never drawn: what a bridge stopped
    meanwhile leaves."""
    appended = store(
        session.id, [said(t) for t in texts], lease=Lease(str(session.id), OWNER, None)
    )
    return [event.seq for event in appended.events]


async def test_it_announces_a_persons_action_after_what_was_stored_before_it(monkeypatch):
    """A prompt recorded by a view while a bridge has events to draw is stored with its
    element, but announced by the bridge in its turn: never before the events before it."""
    sent = _announced(monkeypatch)
    session = await _new_session()
    await _stored_undrawn(session, ["one", "two", "three"])
    prompt = NewEvent.ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go on"})

    await database_sync_to_async(record_and_publish)(session.id, [prompt])

    assert _event_seqs(sent) == []
    kept = dict(await _rows(session))[4]
    assert kept  # drawn as it was stored
    await _record_from_queue(Bridge(str(session.id), OWNER), [])
    assert _event_seqs(sent) == [1, 2, 3, 4]
    assert dict(await _rows(session))[4] == kept
    assert (await _session(session)).undrawn_from is None


async def test_it_catches_a_viewer_up_with_what_was_announced_not_what_is_undrawn():
    """A viewer catching up from the database gets the events drawn and announced; those
    stored and not yet drawn come live, drawn once for all, not rendered for each viewer."""
    from dashboard.agents.consumers import _render_missing

    session = await _new_session()
    lease = Lease(str(session.id), OWNER, None)
    await database_sync_to_async(recording.record)(
        session.id, [said(f"drawn {n}") for n in range(3)], lease=lease, index=False
    )
    await _stored_undrawn(session, ["undrawn"] * 3)

    items = await _render_missing(str(session.id), 0, 100, shared=False)

    assert [seq for seq, _ in items] == [1, 2, 3]


def _agent(data: dict[str, Any]) -> NewEvent:
    return NewEvent.from_line(Event.Source.AGENT, json.dumps(data), data)


@database_sync_to_async
def _status_now(session: AgentSession) -> str:
    return render_state(AgentSession.objects.select_related("sandbox").get(id=session.id))["status"]


async def test_it_announces_the_state_as_it_is_when_its_turn_comes(monkeypatch):
    """A flood that ends a turn (idle) is stored; before it is drawn, a person's prompt
    (working) is recorded, its state announced at once. What the drawer announces after
    the flood is the state as it is then, not the idle it stored: the header never goes
    back to an older state."""
    monkeypatch.setattr(bridge_module, "DRAW_SHARE", 0.0)
    sent = _announced(monkeypatch)
    session = await _new_session()
    flood = _flood(2)
    flood[-1] += [_agent({"type": "system", "subtype": "init"}), _agent({"type": "turn_complete"})]
    drawing, prompted = bridge_module._draw_stored, []

    async def prompt_first(*args: Any) -> Any:
        if not prompted:
            prompted.append(True)
            prompt = NewEvent.ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go on"})
            await database_sync_to_async(record_and_publish)(session.id, [prompt])
        return await drawing(*args)

    monkeypatch.setattr(bridge_module, "_draw_stored", prompt_first)
    await _record_from_queue(Bridge(str(session.id), OWNER), flood)

    assert (await _session(session)).status == AgentSession.Status.WORKING
    states = [message["status"] for _, message in sent if message["type"] == "session.state"]
    assert "badge-working" in states[-1] and states[-1] == await _status_now(session)
    assert _event_seqs(sent) == list(range(1, 2 * RECORD_SLICE + 4))


async def test_it_announces_the_state_after_what_a_stopped_bridge_left():
    """What changed the state among the events a stopped bridge left undrawn went
    unannounced with them: the next bridge announces the state once it has drawn them."""
    session = await _new_session()
    await _stored_undrawn(session, ["left"] * 3)
    undrawn = Undrawn.of(await _session(session))
    assert undrawn.pending and undrawn.state_after == 3
    assert not undrawn.drawn(2, 3) and undrawn.drawn(3, 3)
    await _record_from_queue(Bridge(str(session.id), OWNER), [])
    nothing_left = Undrawn.of(await _session(session))
    assert not nothing_left.pending and nothing_left.state_after is None


async def test_it_finishes_ended_sessions_beside_the_supervisors_ticks(monkeypatch):
    """Drawing what a stopped bridge left can take seconds (tens of thousands of events):
    it runs beside the ticks, which go on heartbeating and claiming meanwhile."""
    from dashboard.agents import supervisor as supervisor_module

    release = threading.Event()
    started = threading.Event()

    def slow_finish(owner: str, running: set[str]) -> list[str]:
        started.set()
        release.wait(20)
        return []

    monkeypatch.setattr(supervisor_module, "finish_unfinished", slow_finish)
    supervisor = BridgeSupervisor("another-worker")
    try:
        await asyncio.wait_for(supervisor.tick(), 10)
        await asyncio.to_thread(started.wait, 10)
        assert started.is_set()
        supervisor.ticks = 0  # the next tick would finish too: not while one is in flight
        await asyncio.wait_for(supervisor.tick(), 10)
        assert supervisor._finishing is not None and not supervisor._finishing.done()
    finally:
        release.set()
        await supervisor.finished()
        await supervisor.stop()


async def test_it_tells_the_feeds_what_was_announced_not_only_stored():
    """A feed that looks for lost messages compares with the last seq announced: what a
    bridge stored and has yet to draw has not been lost."""
    session = await _new_session()
    await _stored_undrawn(session, ["drawn later"] * 3)
    assert await database_sync_to_async(_stored_seqs)([str(session.id)]) == {str(session.id): 0}
    await _record_from_queue(Bridge(str(session.id), OWNER), [])
    assert await database_sync_to_async(_stored_seqs)([str(session.id)]) == {str(session.id): 3}


@database_sync_to_async
def _entries(session: AgentSession) -> list[int]:
    return list(
        SearchEntry.objects.filter(session=session).order_by("seq").values_list("seq", flat=True)
    )


async def test_it_indexes_the_tail_before_what_was_left_undrawn():
    """After an abrupt stop, the index's look back starts where drawing stopped (the rest is
    indexed as it is drawn), however much was stored meanwhile."""
    session = await _new_session()
    lease = Lease(str(session.id), OWNER, None)
    await database_sync_to_async(recording.record)(
        session.id, [said(f"drawn {n}") for n in range(20)], lease=lease, index=False
    )
    await _stored_undrawn(session, [f"undrawn {n}" for n in range(30)])

    await database_sync_to_async(index_tail)(session.id, 10)

    assert await _entries(session) == list(range(11, 21))


@database_sync_to_async
def _lapse_and_end(session: AgentSession) -> None:
    AgentSession.objects.filter(id=session.id).update(
        status=AgentSession.Status.EXITED,
        bridge_lease_until=timezone.now() - timedelta(seconds=1),
    )


async def test_it_finishes_drawing_an_ended_session_whose_bridge_stopped(monkeypatch):
    """A session that ended while its bridge was behind, the bridge then stopped: no bridge
    comes back for it, so a supervisor draws, announces and indexes what was left, and
    releases it."""
    sent = _announced(monkeypatch)
    session = await _new_session()
    lease = Lease(str(session.id), OWNER, None)
    await database_sync_to_async(recording.record)(
        session.id, [said("drawn and indexed")], lease=lease
    )
    await _stored_undrawn(session, [f"left behind {n}" for n in range(150)])
    await _lapse_and_end(session)

    supervisor = BridgeSupervisor("another-worker")
    await supervisor.tick()
    await supervisor.finished()
    await supervisor.stop()

    assert _event_seqs(sent) == list(range(2, 152))
    # Its end went unannounced with the rest (what its bridge held in memory went with it).
    assert [message["type"] for _, message in sent][-2:] == ["session.state", "sessions.row"]
    assert "badge-exited" in sent[-2][1]["status"]
    assert all(html for _, html in await _rows(session))
    assert await _entries(session) == list(range(1, 152))
    finished = await _session(session)
    assert finished.undrawn_from is None and finished.bridge_owner == ""


async def test_it_draws_what_a_stopped_bridge_left_before_recording_on(oc, monkeypatch):
    """A whole bridge, against the embedded sandbox server, takes over a session whose
    previous bridge stored events it never drew: those are drawn and announced first, then
    what the agent says, all in order."""
    sent = _announced(monkeypatch)
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="the new words\nexit 0")
    session = await held_session(sandbox.sandbox_id, agent.session_id, owner=OWNER)
    await _stored_undrawn(session, ["left by the last bridge"] * 5)

    try:
        await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 30)
    finally:
        with contextlib.suppress(Exception):
            await client.kill_sandbox(sandbox.sandbox_id)

    rows = await _rows(session)
    assert _event_seqs(sent)[:5] == [1, 2, 3, 4, 5]
    assert _event_seqs(sent) == sorted(set(_event_seqs(sent)))
    assert all(html for seq, html in rows if seq <= 5)
    assert (await _session(session)).undrawn_from is None


# -- the bookkeeping, as a property --------------------------------------------------------

_operations = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.integers(1, 30), st.booleans()),  # rows, with a state?
        st.tuples(st.just("other"), st.integers(1, 5), st.just(False)),  # a person's, meanwhile
        st.tuples(st.just("draw"), st.integers(1, 40), st.just(False)),  # a slice of this size
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    operations=_operations,
    keep=st.integers(0, 50),
    keep_chars=st.integers(0, 400),
    start=st.integers(0, 20),
)
def test_it_announces_every_stored_seq_once_in_order_and_each_state_after_its_events(
    operations: list[tuple[str, int, bool]], keep: int, keep_chars: int, start: int
) -> None:
    """Whoever stored them: a person's action stored while nothing is undrawn is announced
    by its view; stored behind undrawn events, by the drawer, which learns of it when it
    draws (the database's last seq comes back with each slice)."""
    undrawn = Undrawn(start, start, keep, keep_chars)
    database = start  # the session's last stored seq
    announced: list[int] = []
    changed: list[int] = []  # the last seq stored with each change of state
    states: list[int] = []  # drawn through when the state was announced
    for kind, count, with_state in [*operations, *[("draw", 10_000, False)] * 3]:
        if kind == "store":
            rows = [Event(seq=database + n + 1, raw="x" * (n % 7)) for n in range(count)]
            database += count
            undrawn.stored(rows, with_state)
            if with_state:
                changed.append(database)
            assert len(undrawn.rows) <= keep
            assert undrawn.kept_chars == sum(len(row.raw) for row in undrawn.rows.values())
            assert undrawn.kept_chars <= keep_chars
        elif kind == "other":
            if not undrawn.pending:
                announced += range(database + 1, database + count + 1)  # by its view
            database += count
        elif undrawn.pending:
            first, last, kept = undrawn.next_slice(count)
            assert first == undrawn.drawn_through + 1 and first <= last
            assert set(kept) <= set(range(first, last + 1))
            announced += range(first, last + 1)
            if undrawn.drawn(last, database):
                states.append(last)
    assert announced == list(range(start + 1, database + 1))
    # The state is announced after the events stored before each change, and after the
    # last change at least once.
    assert all(any(changed_at <= at for at in states) for changed_at in changed)
    assert not undrawn.pending and undrawn.rows == {} and undrawn.kept_chars == 0


def test_it_commits_what_it_draws_without_waiting_for_the_disk_but_not_what_it_stores() -> None:
    """On PostgreSQL the elements drawn after storing are derived, and go with the move of
    `undrawn_from` in one transaction: a crash that loses it leaves them to be drawn again.
    What is stored still waits for the disk."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    if connection.vendor != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    session = async_to_sync(_new_session)()
    with connection.cursor() as cursor:  # the team-mode run connects with it off, for speed
        cursor.execute("SET synchronous_commit = on")
    try:
        with CaptureQueriesContext(connection) as storing:
            store(session.id, [said("durable first")])
        with CaptureQueriesContext(connection) as drawing:
            recording.draw_stored(session.id, 1, 1, {}, ToolIndex())
        assert not any("synchronous_commit" in query["sql"] for query in storing)
        assert any("'synchronous_commit', 'off', true" in query["sql"] for query in drawing)
        assert dict(Event.objects.filter(session=session).values_list("seq", "html"))[1]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")
