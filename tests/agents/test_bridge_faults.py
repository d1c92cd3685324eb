"""Faults injected into the bridge's upstream, against the embedded server's demo agent.

A flood's events carry their index ("flood i/N"), so what was stored can be checked for
every event: none lost, none twice, in order, even when the flood is larger than the
ring and the whole output can no longer be replayed to compare with.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from dashboard.agents import bridge as bridge_module
from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.opencomputer import ExecStream, OpenComputer, connect_stream, stream_url
from tests.agents.helpers import wait_for
from tests.proxy import ChaosProxy, CuttableProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(200)]

OWNER = "faults-worker"


@database_sync_to_async
def _new_session(sandbox_id: str, session_id: str) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=sandbox_id)
    return AgentSession.objects.create(
        sandbox=sandbox,
        upstream_id=session_id,
        bridge_owner=OWNER,
        bridge_lease_until=timezone.now() + timedelta(seconds=600),
    )


@database_sync_to_async
def _count(session: AgentSession, **filters: object) -> int:
    return Event.objects.filter(session=session, **filters).count()


@database_sync_to_async
def flood_indices(session: AgentSession) -> list[tuple[int, int]]:
    """(i, N) of every stored "flood i/N" text, in stored order."""
    found = []
    rows = Event.objects.filter(session=session, type="assistant").order_by("seq")
    for raw in rows.values_list("raw", flat=True):
        for block in json.loads(raw)["message"]["content"]:
            text = block.get("text", "")
            if text.startswith("flood "):
                index, count = text.split()[1].split("/")
                found.append((int(index), int(count)))
    return found


def figures(name: str, found: list[tuple[int, int]], emitted: int, **extra: object) -> None:
    """One line for docs/reliability.md: events emitted / stored / lost / duplicated.
    (Run with `-s` to see it.) Pieces of a paced flood each count from 1 again."""
    keys, piece, previous = [], 0, 0
    for index, _ in found:
        if index <= previous and index == 1:
            piece += 1
        keys.append((piece, index))
        previous = index
    distinct = len(set(keys))
    details = " ".join(f"{k}={v}" for k, v in extra.items())
    print(
        f"\nFIGURES {name}: emitted={emitted} stored={len(found)} lost={emitted - distinct} "
        f"duplicated={len(found) - distinct} {details}"
    )


def assert_whole_flood(found: list[tuple[int, int]], count: int) -> None:
    indices = [i for i, n in found if n == count]
    duplicated = len(indices) - len(set(indices))
    lost = count - len(set(indices))
    assert (lost, duplicated) == (0, 0), f"lost {lost}, duplicated {duplicated}"
    assert indices == list(range(1, count + 1)), "out of order"


async def _start(oc, prompt: str) -> tuple[OpenComputer, str, str]:  # type: ignore[no-untyped-def]
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt=prompt)
    return client, sandbox.sandbox_id, agent.session_id


def through(proxy: CuttableProxy, oc) -> Callable[[str, str], Awaitable[ExecStream]]:  # type: ignore[no-untyped-def]
    target = urlsplit(oc.api_url)
    base = oc.api_url.replace(f":{target.port}/", f":{proxy.port}/")

    async def open_stream(sandbox: str, session: str) -> ExecStream:
        return await connect_stream(stream_url(base, sandbox, session, api_key=oc.api_key))

    return open_stream


async def _proxy(oc, kind: type[CuttableProxy] = CuttableProxy, **options: object) -> CuttableProxy:  # type: ignore[no-untyped-def]
    target = urlsplit(oc.api_url)
    return await kind(target.hostname or "127.0.0.1", target.port or 80, **options).start()  # type: ignore[arg-type]


async def test_it_loses_nothing_when_cut_twenty_times_during_a_flood(oc):
    """The chaos proxy cuts every upstream connection at a random point (within the replay
    or after it) until it has cut 25 times: 0 lost, 0 duplicated, 0 gaps."""
    pieces, each = 30, 400
    script = "\n".join(["sleep 1"] + [f"flood {each} 400\nsleep 0.3"] * pieces + ["exit 0"])
    client, sandbox_id, session_id = await _start(oc, script)
    session = await _new_session(sandbox_id, session_id)
    proxy = await _proxy(oc, ChaosProxy, low=256 * 1024, high=2 * 1024 * 1024, limit=25, seed=7)
    assert isinstance(proxy, ChaosProxy)
    bridge = Bridge(str(session.id), OWNER, open_stream=through(proxy, oc))

    await asyncio.wait_for(bridge.run(), 150)
    await proxy.close()

    found = await flood_indices(session)
    gaps = await _count(session, source=Event.Source.BRIDGE, type="gap")
    figures("chaos proxy", found, pieces * each, cuts=proxy.cuts, gaps=gaps)
    assert proxy.cuts >= 20
    assert await _count(session, source=Event.Source.BRIDGE, type="reconnected") >= 20
    assert gaps == 0
    assert len(found) == pieces * each
    for piece in range(pieces):
        assert_whole_flood(found[piece * each : (piece + 1) * each], each)
    assert await _count(session, source=Event.Source.BRIDGE, type="exit") == 1
    await client.aclose()


async def test_it_reconnects_at_once_however_far_recording_is_behind(oc, monkeypatch):
    """Issue 7: the bridge reconnected only after its recorder worked through the backlog,
    and the ring had evicted output meanwhile. Here recording is slowed far below the
    flood's pace and the socket is cut early: nothing may be lost."""
    real = bridge_module._record.func  # type: ignore[attr-defined]

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)  # ~500 events a second at most
        return real(*args, **kwargs)

    monkeypatch.setattr(bridge_module, "_record", database_sync_to_async(slow))
    # The cut lands during the pause, with thousands of events still queued for recording:
    # waiting for them before reconnecting, the ring (~3000 of these) would overflow.
    first, count = 3000, 8000
    client, sandbox_id, session_id = await _start(
        oc, f"flood {first} 300\nsleep 4\nflood {count} 300\nexit 0"
    )
    session = await _new_session(sandbox_id, session_id)
    proxy = await _proxy(oc)
    bridge = Bridge(str(session.id), OWNER, open_stream=through(proxy, oc))
    task = asyncio.create_task(bridge.run())

    async def some_stored() -> bool:
        return await _count(session, type="assistant") >= 100

    await wait_for(some_stored, 60)
    proxy.cut()  # then ~2.6 MB more in the second flood: far more than the 1 MiB ring
    await asyncio.wait_for(task, 170)
    await proxy.close()

    found = await flood_indices(session)
    gaps = await _count(session, source=Event.Source.BRIDGE, type="gap")
    figures("cut while recording is behind", found, first + count, gaps=gaps)
    assert bridge.connections >= 2
    assert_whole_flood(found[:first], first)
    assert_whole_flood(found[first:], count)
    assert await _count(session, source=Event.Source.BRIDGE, type="gap") == 0
    await client.aclose()
