"""How a bridge feeds the search index: after recording, several batches at once, and
after an abrupt stop, by the bridge that takes over.

The bridges here record from their queue directly (no upstream): what is checked is when
the index gets which rows, against the real database.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext
from channels.db import database_sync_to_async

from dashboard.agents import bridge as bridge_module
from dashboard.agents.bridge import INDEX_HELD_EVENTS, RECORD_SLICE, Bridge, _tool_index
from dashboard.agents.leases import Lease
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import NewEvent, record
from dashboard.search.index import index_tail, search
from dashboard.search.models import SearchEntry
from tests.agents.helpers import held_session

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

OWNER = "index-worker"

_new_session = functools.partial(
    held_session, "sb-index", "ses-index", owner=OWNER, lease_seconds=60
)


def _said(text: str) -> NewEvent:
    data = {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}
    return NewEvent.from_line(Event.Source.AGENT, json.dumps(data), data)


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
    appended, _ = record(session.id, [_said(t) for t in texts], lease=lease, index=False)
    return [event.seq for event in appended.events]


async def _record_from_queue(bridge: Bridge, batches: list[list[NewEvent]]) -> None:
    """The bridge's recorder alone, with `batches` already waiting, then the end."""
    bridge.lease = Lease(bridge.session_id, OWNER, None)
    async with ThreadSensitiveContext():
        bridge._tools = await _tool_index(bridge.session_id)
        for batch in batches:
            bridge._hand_over(batch)
        bridge._queue.put_nowait(None)
        await bridge._record_loop()


async def test_it_indexes_what_it_records_once_its_queue_is_empty(monkeypatch):
    """Three batches waiting: recorded as two slices, indexed once, with the rows of both;
    no row is indexed before the recorder has recorded everything that was waiting."""
    given: list[list[int]] = []
    index = bridge_module._index_events

    async def spy(rows: list[Event]) -> None:
        given.append([row.seq for row in rows])
        await index(rows)

    monkeypatch.setattr(bridge_module, "_index_events", spy)
    session = await _new_session()
    batches = [[_said(f"aardvark {b}-{n}") for n in range(RECORD_SLICE // 2)] for b in range(3)]

    await _record_from_queue(Bridge(str(session.id), OWNER), batches)

    everything = list(range(1, 3 * RECORD_SLICE // 2 + 1))
    assert given == [everything]
    assert await _indexed(session) == everything
    hits = await database_sync_to_async(search)("aardvark")
    assert {hit.seq for hit in hits} <= set(everything) and hits


async def test_it_holds_back_no_more_than_its_bound(monkeypatch):
    """A recorder that never runs dry (a flood) still hands the index its rows once it holds
    `INDEX_HELD_EVENTS` of them: what a crash can leave unindexed stays bounded."""
    monkeypatch.setattr(bridge_module, "INDEX_HELD_EVENTS", RECORD_SLICE * 2)
    given: list[int] = []
    index = bridge_module._index_events

    async def spy(rows: list[Event]) -> None:
        given.append(len(rows))
        await index(rows)

    monkeypatch.setattr(bridge_module, "_index_events", spy)
    session = await _new_session()
    batches = [[_said(f"flood {b}-{n}") for n in range(RECORD_SLICE)] for b in range(5)]

    await _record_from_queue(Bridge(str(session.id), OWNER), batches)

    assert given == [2 * RECORD_SLICE, 2 * RECORD_SLICE, RECORD_SLICE]
    assert len(await _indexed(session)) == 5 * RECORD_SLICE


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
    await database_sync_to_async(index_tail)(session.id, INDEX_HELD_EVENTS)
    assert await _indexed(session) == seqs[-10:] + more


async def test_it_never_lets_a_failing_index_stop_a_bridge(monkeypatch, caplog: Any):
    from dashboard.search import index

    def refused(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the index is broken")

    monkeypatch.setattr(index, "insert_many", refused)
    session = await _new_session()

    await asyncio.wait_for(
        _record_from_queue(Bridge(str(session.id), OWNER), [[_said("kept all the same")]]), 30
    )

    stored = await database_sync_to_async(
        lambda: list(Event.objects.filter(session=session).values_list("seq", flat=True))
    )()
    assert stored == [1]
    assert "could not index" in caplog.text
