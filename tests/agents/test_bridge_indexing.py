"""How a bridge feeds the search index: on a thread of its own, several batches at once,
never in the way of recording, and after an abrupt stop, by the bridge that takes over.

The bridges here record from their queue directly (no upstream): what is checked is when
the index gets which rows, against the real database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext
from channels.db import database_sync_to_async
from django.utils import timezone

from dashboard.agents import bridge as bridge_module
from dashboard.agents.bridge import INDEX_TAIL, RECORD_SLICE, Bridge, IndexFeed, _tool_index
from dashboard.agents.leases import Lease
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import NewEvent, record
from dashboard.agents.supervisor import BridgeSupervisor
from dashboard.opencomputer import OpenComputer
from dashboard.search.index import index_events, index_tail, search
from dashboard.search.models import SearchEntry
from tests.agents.helpers import held_session, said, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

OWNER = "index-worker"

_new_session = functools.partial(
    held_session, "sb-index", "ses-index", owner=OWNER, lease_seconds=60
)


@database_sync_to_async
def _indexed(session: AgentSession) -> list[int]:
    return list(
        SearchEntry.objects.filter(session=session).order_by("seq").values_list("seq", flat=True)
    )


@database_sync_to_async
def _recorded_unindexed(session: AgentSession, texts: list[str]) -> list[int]:
    """Stored as a bridge stores them (`index=False`), never handed to the index: what a
    bridge that was killed meanwhile leaves behind."""
    lease = Lease(str(session.id), OWNER, None)
    appended, _ = record(session.id, [said(t) for t in texts], lease=lease, index=False)
    return [event.seq for event in appended.events]


def _spy_on_index(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[], Awaitable[Any]] | None = None
) -> list[list[int]]:
    """The seqs of each batch the bridge gives the index (which still writes them)."""
    given: list[list[int]] = []
    index = bridge_module._index_events

    async def spy(rows: list[Event]) -> None:
        given.append([row.seq for row in rows])
        if before is not None:
            await before()
        await index(rows)

    monkeypatch.setattr(bridge_module, "_index_events", spy)
    return given


@database_sync_to_async
def _stored(session: AgentSession) -> int:
    return Event.objects.filter(session=session).count()


async def _record_from_queue(bridge: Bridge, batches: list[list[NewEvent]]) -> None:
    """The bridge's recorder alone, with `batches` already waiting, then the end."""
    bridge.lease = Lease(bridge.session_id, OWNER, None)
    async with ThreadSensitiveContext():
        bridge._tools = await _tool_index(bridge.session_id)
        for batch in batches:
            bridge._hand_over(batch)
        bridge._queue.put_nowait(None)
        await bridge._record_loop()


async def test_it_indexes_a_batch_at_a_time_and_everything_by_the_end(monkeypatch):
    """Three batches recorded within `INDEX_AFTER`: indexed as one batch, and by the time
    the bridge has recorded the session's end, every row is in the index."""
    monkeypatch.setattr(bridge_module, "INDEX_AFTER", 60.0)
    given = _spy_on_index(monkeypatch)
    session = await _new_session()
    batches = [[said(f"aardvark {b}-{n}") for n in range(RECORD_SLICE // 2)] for b in range(3)]

    await _record_from_queue(Bridge(str(session.id), OWNER), batches)

    everything = list(range(1, 3 * RECORD_SLICE // 2 + 1))
    assert given == [everything]
    assert await _indexed(session) == everything
    hits = await database_sync_to_async(search)("aardvark")
    assert {hit.seq for hit in hits} <= set(everything) and hits


async def test_it_hands_the_index_its_bound_without_waiting_for_the_time(monkeypatch):
    """A flood reaches `INDEX_HELD_EVENTS` long before `INDEX_AFTER`: what a bridge holds
    back, and what a crash can leave unindexed, stays bounded."""
    monkeypatch.setattr(bridge_module, "INDEX_AFTER", 60.0)
    monkeypatch.setattr(bridge_module, "INDEX_HELD_EVENTS", 2 * RECORD_SLICE)
    given = _spy_on_index(monkeypatch)
    session = await _new_session()
    batches = [[said(f"flood {b}-{n}") for n in range(RECORD_SLICE)] for b in range(5)]

    await _record_from_queue(Bridge(str(session.id), OWNER), batches)

    assert len(given) >= 2  # without the bound: one batch, at the end
    assert sorted(seq for rows in given for seq in rows) == list(range(1, 5 * RECORD_SLICE + 1))
    assert len(await _indexed(session)) == 5 * RECORD_SLICE


async def test_it_records_on_while_the_index_is_slow(monkeypatch):
    """The index is written on a thread of its own: a stuck index write holds back no
    recording (and so no viewer) until the bridge holds twice its bound."""
    monkeypatch.setattr(bridge_module, "INDEX_AFTER", 0.0)
    unstuck = asyncio.Event()
    given = _spy_on_index(monkeypatch, before=unstuck.wait)
    session = await _new_session()
    bridge = Bridge(str(session.id), OWNER)
    batches = [[said(f"stuck {b}-{n}") for n in range(RECORD_SLICE)] for b in range(3)]
    recording = asyncio.create_task(_record_from_queue(bridge, batches))

    async def all_stored() -> bool:
        return await _stored(session) == 3 * RECORD_SLICE

    await wait_for(all_stored)
    assert await _indexed(session) == []
    unstuck.set()
    await asyncio.wait_for(recording, 30)
    assert sum(len(rows) for rows in given) == 3 * RECORD_SLICE
    assert len(await _indexed(session)) == 3 * RECORD_SLICE


async def test_it_waits_for_the_index_once_twice_its_bound_is_held_back(monkeypatch):
    monkeypatch.setattr(bridge_module, "INDEX_HELD_EVENTS", 10)
    feed = IndexFeed("unsaved")
    written = asyncio.get_running_loop().create_future()

    async def in_flight() -> None:
        await written

    feed.writing = asyncio.create_task(in_flight())
    rows = [Event(seq=n, raw="x") for n in range(15)]
    under = asyncio.create_task(feed.hold(rows))
    await asyncio.sleep(0)  # one turn of the loop: the hand-over has nothing to wait for
    assert under.done()
    over = asyncio.create_task(feed.hold(rows[:5]))  # 20 held: twice the bound
    await asyncio.sleep(0)
    assert not over.done()
    written.set_result(None)
    await asyncio.wait_for(over, 5)


async def test_it_indexes_what_a_bridge_killed_before_indexing_left_behind():
    """The bridge that takes over indexes the events its predecessor stored and never
    indexed, as it starts, before anything new comes."""
    session = await _new_session()
    seqs = await _recorded_unindexed(session, [f"orphaned okapi {n}" for n in range(30)])
    assert await _indexed(session) == []

    await _record_from_queue(Bridge(str(session.id), OWNER), [])

    assert await _indexed(session) == seqs


async def test_it_looks_no_further_back_than_a_bridge_can_hold():
    """Catching up reads at most the last `span` events (a bridge holds back no more), so
    resuming a long session never rescans it; older gaps are `reindex_search`'s."""
    session = await _new_session()
    seqs = await _recorded_unindexed(session, [f"old ocelot {n}" for n in range(30)])

    written = await database_sync_to_async(index_tail)(session.id, 10)

    assert written == 10
    assert await _indexed(session) == seqs[-10:]
    more = await _recorded_unindexed(session, [f"new ocelot {n}" for n in range(5)])
    await database_sync_to_async(index_tail)(session.id, 17)  # 12 old ones, 5 new
    assert await _indexed(session) == seqs[-12:] + more


async def test_it_reads_again_only_the_kinds_of_event_the_index_finds_something_in(monkeypatch):
    """Most of a session never has an entry (stream events, system lines): a bridge that
    takes over does not parse them all again to find that out."""
    from dashboard.search import index

    session = await _new_session()
    lease = Lease(str(session.id), OWNER, None)
    streamed = [
        NewEvent.from_line(Event.Source.AGENT, json.dumps(line), line)
        for line in [{"type": "stream_event", "event": {"n": n}} for n in range(20)]
    ]
    await database_sync_to_async(record)(session.id, streamed, lease=lease, index=False)
    seqs = await _recorded_unindexed(session, ["lonely lynx"])
    parsed: list[str] = []
    real = index.extract

    def counted(source: str, kind: str, raw: str, data: Any = None) -> Any:
        parsed.append(kind)
        return real(source, kind, raw, data)

    monkeypatch.setattr(index, "extract", counted)
    assert await database_sync_to_async(index_tail)(session.id, INDEX_TAIL) == 1
    assert parsed == ["assistant"]
    assert await _indexed(session) == seqs


async def test_it_still_finds_an_agents_line_too_long_to_parse_left_behind(monkeypatch):
    from dashboard.search import extract, index

    monkeypatch.setattr(extract, "PARSE_MAX", 100)
    monkeypatch.setattr(index, "PARSE_MAX", 100)
    session = await _new_session()
    lease = Lease(str(session.id), OWNER, None)
    line = NewEvent.from_line(Event.Source.AGENT, "mighty marmot " * 20, None)  # not JSON
    appended, _ = await database_sync_to_async(record)(session.id, [line], lease=lease, index=False)

    assert await database_sync_to_async(index_tail)(session.id, INDEX_TAIL) == 1
    assert await _indexed(session) == [appended.events[0].seq]


async def test_it_indexes_what_a_bridge_left_behind_a_persons_action_indexed_since():
    """A person's prompt is indexed as it is recorded: one that came after what a killed
    bridge held back must not hide those events from the bridge that takes over."""
    session = await _new_session()
    seqs = await _recorded_unindexed(session, [f"hidden heron {n}" for n in range(8)])
    prompt = NewEvent.ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "heron?"})
    appended, _ = await database_sync_to_async(record)(session.id, [prompt])  # indexed
    assert await _indexed(session) == [appended.events[0].seq]

    await _record_from_queue(Bridge(str(session.id), OWNER), [])

    assert await _indexed(session) == [*seqs, appended.events[0].seq]
    found = await database_sync_to_async(search)("heron")
    assert {hit.seq for hit in found} == {*seqs, appended.events[0].seq}


async def test_it_never_lets_a_failing_index_stop_a_bridge(monkeypatch, caplog: Any):
    from dashboard.search import index

    def refused(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the index is broken")

    monkeypatch.setattr(index, "insert_many", refused)
    session = await _new_session()

    await asyncio.wait_for(
        _record_from_queue(Bridge(str(session.id), OWNER), [[said("kept all the same")]]), 30
    )

    stored = await database_sync_to_async(
        lambda: list(Event.objects.filter(session=session).values_list("seq", flat=True))
    )()
    assert stored == [1]
    assert "could not index" in caplog.text


async def test_it_has_no_index_write_running_once_a_stopped_bridge_returns(oc, monkeypatch):
    """A bridge stopped mid-session (a takeover, a shutdown) returns only when the index
    thread has finished what it was writing for it: a cancelled task does not stop a thread,
    and a write still running after the bridge was thought gone met the next owner's, or a
    test's teardown, on the same rows (deadlocks on PostgreSQL)."""
    monkeypatch.setattr(bridge_module, "INDEX_AFTER", 0.0)
    began, ended = threading.Event(), threading.Event()

    def slow_index(rows: list[Event]) -> None:
        began.set()
        time.sleep(0.5)  # a slow write (a large batch, a busy database)
        ended.set()
        index_events(rows)

    monkeypatch.setattr(bridge_module, "_index_events", bridge_module.on_index_thread(slow_index))
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="flood 20\nsleep 30\nexit 0")
    session = await held_session(
        sandbox.sandbox_id, agent.session_id, owner=OWNER, lease_seconds=60
    )
    running = asyncio.create_task(Bridge(str(session.id), OWNER).run())

    async def writing() -> bool:
        return began.is_set()

    await wait_for(writing)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    assert ended.is_set()
    await client.kill_sandbox(sandbox.sandbox_id)
    await client.aclose()


@database_sync_to_async
def _lapse(session: AgentSession) -> None:
    AgentSession.objects.filter(id=session.id).update(
        bridge_lease_until=timezone.now() - timedelta(seconds=1)
    )


@database_sync_to_async
def _lease_of(session: AgentSession) -> str:
    return AgentSession.objects.values_list("bridge_owner", flat=True).get(id=session.id)


async def test_it_finishes_an_ended_session_whose_bridge_stopped_before_indexing_its_end():
    """A bridge killed between recording the exit and indexing it: no bridge resumes an
    ended session, so a supervisor, seeing its lease lapsed and never released, indexes
    what was left and releases it."""
    session = await _new_session()
    exit_note = NewEvent.ours(Event.Source.BRIDGE, {"type": "exit", "code": 0})
    lease = Lease(str(session.id), OWNER, None)
    await database_sync_to_async(record)(
        session.id, [said("indexed already"), exit_note], lease=lease
    )
    seqs = await _recorded_unindexed(session, ["the last words of a jackal"])
    await _lapse(session)
    # Still held by a bridge elsewhere (finishing it as this runs): not finished here.
    others = await held_session("sb-other", "ses-other", owner=OWNER, lease_seconds=60)
    held = Lease(str(others.id), OWNER, None)
    await database_sync_to_async(record)(others.id, [exit_note], lease=held)

    supervisor = BridgeSupervisor("another-worker")
    await supervisor.tick()
    await supervisor.finished()

    assert seqs[0] in await _indexed(session)
    hits = await database_sync_to_async(lambda: [(h.session.id, h.seq) for h in search("jackal")])()
    assert hits == [(session.id, seqs[0])]
    assert await _lease_of(session) == ""
    assert await _lease_of(others) == OWNER
    await supervisor.stop()


async def test_it_keeps_the_lease_of_an_ended_session_stopped_before_its_end_was_indexed():
    """The lease of such a bridge is left to lapse (then the session is finished as above);
    a bridge of a live session stopped alike releases it at once for the next owner."""

    class Stopped:
        def __init__(self, session_id: str, ended: bool) -> None:
            self.session_id, self.ended, self.complete = session_id, ended, False

        async def run(self) -> None:
            await asyncio.Event().wait()  # until cancelled (a shutdown)

    supervisor = BridgeSupervisor(OWNER)
    outcomes = []
    for ended in (True, False):
        session = await held_session(f"sb-{ended}", f"ses-{ended}", owner=OWNER)
        lease = Lease(str(session.id), OWNER, None)
        stopped = Stopped(str(session.id), ended)
        running = asyncio.create_task(supervisor._run_bridge(stopped, lease))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        outcomes.append(await _lease_of(session))
    assert outcomes == [OWNER, ""]
