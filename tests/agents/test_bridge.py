"""The bridge against the embedded sandbox server, over real loopback sockets.

What the bridge stored is compared with what the agent really printed: after the process
exits, a fresh attach replays the whole scrollback, which (while under the ring's size) is
the ground truth.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from dashboard.agents.bridge import BACKOFF_CAP, DELIVERING_BACKOFF_CAP, Bridge, retry_wait
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.supervisor import BridgeSupervisor
from dashboard.opencomputer import (
    JSONLineAssembler,
    OpenComputer,
    Stdout,
    connect_stream,
    stream_url,
)
from tests.agents.helpers import held_session, wait_for
from tests.proxy import CuttableProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

OWNER = "test-worker"


_new_session = functools.partial(held_session, owner=OWNER, lease_seconds=60, title="test")


@database_sync_to_async
def _stored(session: AgentSession, source: str = Event.Source.AGENT) -> list[str]:
    return list(
        Event.objects.filter(session=session, source=source)
        .order_by("seq")
        .values_list("raw", flat=True)
    )


@database_sync_to_async
def _count(session: AgentSession, **filters: object) -> int:
    return Event.objects.filter(session=session, **filters).count()


@database_sync_to_async
def _reload(session: AgentSession) -> AgentSession:
    return AgentSession.objects.get(id=session.id)


@database_sync_to_async
def _retake_lease(session: AgentSession, owner: str) -> None:
    AgentSession.objects.filter(id=session.id).update(
        bridge_owner=owner, bridge_lease_until=timezone.now() + timedelta(seconds=60)
    )


async def _printed(oc, sandbox_id: str, session_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Every stdout line the session printed, read from a fresh attach after its exit."""
    assembler = JSONLineAssembler()
    lines: list[str] = []
    async with await connect_stream(
        stream_url(oc.api_url, sandbox_id, session_id, api_key=oc.api_key)
    ) as stream:
        async for frame in stream:
            if isinstance(frame, Stdout):
                lines += [line.text for line in assembler.feed(frame.data)]
    return lines + [line.text for line in assembler.flush()]


async def _start(oc, prompt: str) -> tuple[OpenComputer, str, str]:  # type: ignore[no-untyped-def]
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt=prompt)
    return client, sandbox.sandbox_id, agent.session_id


async def test_it_records_a_whole_demo_session_with_no_viewer(oc):
    client, sandbox_id, session_id = await _start(oc, "Hello **there**\n$ echo hi\nexit 3")
    session = await _new_session(sandbox_id, session_id)

    await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 30)

    stored = await _stored(session)
    assert stored == await _printed(oc, sandbox_id, session_id)
    kinds = [json.loads(line)["type"] for line in stored]
    assert kinds[0] == "ready"
    assert {"system", "assistant", "user"} <= set(kinds)
    session = await _reload(session)
    assert session.status == AgentSession.Status.EXITED
    assert session.exit_code == 3
    assert session.model == "demo"
    assert session.claude_session_id
    assert await _count(session, source=Event.Source.BRIDGE, type="exit") == 1
    await client.aclose()


async def test_it_follows_turns_into_totals_and_status(oc):
    client, sandbox_id, session_id = await _start(oc, "one turn")
    session = await _new_session(sandbox_id, session_id)
    bridge = Bridge(str(session.id), OWNER)
    task = asyncio.create_task(bridge.run())

    def idle_after(turns: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            fresh = await _reload(session)
            return fresh.status == AgentSession.Status.IDLE and fresh.num_turns == turns

        return check

    await wait_for(idle_after(1))
    await client.send_prompt(sandbox_id, session_id, "second turn")
    await wait_for(idle_after(2))
    await client.send_prompt(sandbox_id, session_id, "exit 0")
    await asyncio.wait_for(task, 30)
    session = await _reload(session)
    assert session.status == AgentSession.Status.EXITED
    await client.aclose()


async def test_it_loses_and_duplicates_nothing_when_the_socket_is_cut(oc):
    client, sandbox_id, session_id = await _start(
        oc, "flood 200 150\nsleep 3\nflood 200 150\nexit 0"
    )
    session = await _new_session(sandbox_id, session_id)
    target = urlsplit(oc.api_url)
    proxy = await CuttableProxy(target.hostname or "127.0.0.1", target.port or 80).start()
    proxied_base = oc.api_url.replace(f":{target.port}/", f":{proxy.port}/")

    async def open_through_proxy(sandbox: str, upstream_session: str):  # type: ignore[no-untyped-def]
        return await connect_stream(
            stream_url(proxied_base, sandbox, upstream_session, api_key=oc.api_key)
        )

    bridge = Bridge(str(session.id), OWNER, open_stream=open_through_proxy)
    task = asyncio.create_task(bridge.run())

    async def first_flood_stored() -> bool:
        return await _count(session, source=Event.Source.AGENT, type="assistant") >= 200

    await wait_for(first_flood_stored)
    proxy.cut()
    await asyncio.wait_for(task, 45)
    await proxy.close()

    stored = await _stored(session)
    assert stored == await _printed(oc, sandbox_id, session_id)
    assert len(stored) == len(set(stored)), "a line was stored twice"
    assert bridge.connections >= 2
    assert await _count(session, source=Event.Source.BRIDGE, type="reconnected") >= 1
    assert await _count(session, source=Event.Source.BRIDGE, type="gap") == 0
    await client.aclose()


async def test_it_resumes_recording_after_a_restart(oc):
    client, sandbox_id, session_id = await _start(oc, "flood 50\nsleep 2\nflood 50\nexit 0")
    session = await _new_session(sandbox_id, session_id)
    first = asyncio.create_task(Bridge(str(session.id), OWNER).run())

    async def some_stored() -> bool:
        return await _count(session, source=Event.Source.AGENT, type="assistant") >= 50

    await wait_for(some_stored)
    first.cancel()  # the dashboard goes down mid-turn
    with pytest.raises(asyncio.CancelledError):
        await first

    await _retake_lease(session, "restarted-worker")
    await asyncio.wait_for(Bridge(str(session.id), "restarted-worker").run(), 30)

    stored = await _stored(session)
    assert stored == await _printed(oc, sandbox_id, session_id)
    assert (await _reload(session)).status == AgentSession.Status.EXITED
    await client.aclose()


async def test_it_records_a_gap_when_the_ring_evicted_unread_output(oc):
    # About 2.4 MB of output before anyone reads: more than the 1 MiB ring holds.
    client, sandbox_id, session_id = await _start(oc, "flood 8000 300\nexit 0")

    async def exited() -> bool:
        infos = await client.list_exec(sandbox_id)
        return any(i.session_id == session_id and not i.running for i in infos)

    await wait_for(exited, 60)
    session = await _new_session(sandbox_id, session_id)
    await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 60)

    gaps = await _count(session, source=Event.Source.BRIDGE, type="gap")
    assert gaps == 1
    stored = await _stored(session)
    assert all(json.loads(line) for line in stored), "a cut line was stored"
    assert stored == [
        line for line in await _printed(oc, sandbox_id, session_id) if line.startswith("{")
    ]
    assert (await _reload(session)).exit_code == 0
    await client.aclose()


async def test_it_records_a_lost_session_when_the_sandbox_is_gone(oc):
    client, sandbox_id, session_id = await _start(oc, "sleep 30")
    session = await _new_session(sandbox_id, session_id)
    await client.kill_sandbox(sandbox_id)
    await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 30)
    session = await _reload(session)
    assert session.status in (AgentSession.Status.LOST, AgentSession.Status.EXITED)
    await client.aclose()


async def test_it_has_the_supervisor_claim_live_sessions_and_skip_held_ones(oc, caplog):
    caplog.set_level(logging.INFO, logger="dashboard.agents.supervisor")
    client, sandbox_id, session_id = await _start(oc, "hi\nexit 0")
    session = await _new_session(sandbox_id, session_id)
    await _retake_lease(session, "someone-else")
    supervisor = BridgeSupervisor(owner="me")
    assert await supervisor.tick() == []  # held by a live lease elsewhere

    await database_sync_to_async(AgentSession.objects.filter(id=session.id).update)(
        bridge_lease_until=timezone.now() - timedelta(seconds=1)
    )
    assert await supervisor.tick() == [str(session.id)]
    # An operator can tell which worker records a session, and since when.
    claimed = [r for r in caplog.records if "claimed by me" in r.getMessage()]
    assert [getattr(r, "session_id", "") for r in claimed] == [str(session.id)]
    await asyncio.wait_for(supervisor.bridges[str(session.id)], 30)
    assert (await _reload(session)).status == AgentSession.Status.EXITED
    await supervisor.stop()
    await client.aclose()


async def test_it_gives_a_session_to_exactly_one_of_two_workers(oc):
    client, sandbox_id, session_id = await _start(oc, "hi\nsleep 1\nexit 0")
    session = await _new_session(sandbox_id, session_id)
    await database_sync_to_async(AgentSession.objects.filter(id=session.id).update)(
        bridge_owner="", bridge_lease_until=None
    )
    first, second = BridgeSupervisor(owner="worker-1"), BridgeSupervisor(owner="worker-2")
    claims = await asyncio.gather(first.tick(), second.tick())
    assert sorted(len(c) for c in claims) == [0, 1]
    winner = first if claims[0] else second
    await asyncio.wait_for(winner.bridges[str(session.id)], 30)
    stored = await _stored(session)
    assert stored == await _printed(oc, sandbox_id, session_id)
    for supervisor in (first, second):
        await supervisor.stop()
    await client.aclose()


async def test_it_stops_a_bridge_whose_lease_another_worker_took(oc):
    client, sandbox_id, session_id = await _start(oc, "sleep 20")
    session = await _new_session(sandbox_id, session_id)
    bridge = Bridge(str(session.id), OWNER)
    task = asyncio.create_task(bridge.run())

    async def working() -> bool:
        return (await _reload(session)).status == AgentSession.Status.WORKING

    await wait_for(working)
    await _retake_lease(session, "new-owner")
    await asyncio.wait_for(task, 30)  # its next write is refused: it stops by itself
    assert (await _reload(session)).status == AgentSession.Status.WORKING
    await client.kill_sandbox(sandbox_id)
    await client.aclose()


async def test_it_masks_the_api_key_an_agent_prints_and_still_aligns_replays(oc, settings):
    settings.OPENCOMPUTER_API_KEY = oc.api_key
    client, sandbox_id, session_id = await _start(
        oc, f"The key is {oc.api_key}\n$ echo {oc.api_key}\nsleep 2\nexit 0"
    )
    session = await _new_session(sandbox_id, session_id)
    target = urlsplit(oc.api_url)
    proxy = await CuttableProxy(target.hostname or "127.0.0.1", target.port or 80).start()
    proxied_base = oc.api_url.replace(f":{target.port}/", f":{proxy.port}/")

    async def open_through_proxy(sandbox: str, upstream_session: str):  # type: ignore[no-untyped-def]
        return await connect_stream(
            stream_url(proxied_base, sandbox, upstream_session, api_key=oc.api_key)
        )

    task = asyncio.create_task(Bridge(str(session.id), OWNER, open_stream=open_through_proxy).run())

    async def key_lines_stored() -> bool:
        return await _count(session, raw__contains="[redacted]") >= 3

    await wait_for(key_lines_stored)
    proxy.cut()  # the replay after reconnecting holds the unmasked lines again
    await asyncio.wait_for(task, 30)
    await proxy.close()

    stored = await _stored(session)
    assert not any(oc.api_key in line for line in stored)
    printed = await _printed(oc, sandbox_id, session_id)
    assert stored == [line.replace(oc.api_key, "[redacted]") for line in printed]
    await client.aclose()


async def test_it_writes_configure_lines_from_any_worker_to_the_agent(oc):
    from channels.layers import get_channel_layer

    from dashboard.agents.recording import bridge_group

    client, sandbox_id, session_id = await _start(oc, "hello")
    session = await _new_session(sandbox_id, session_id)
    task = asyncio.create_task(Bridge(str(session.id), OWNER).run())

    async def idle() -> bool:
        return (await _reload(session)).status == AgentSession.Status.IDLE

    await wait_for(idle)
    line = {"type": "configure", "model": "configured-by-test"}
    await get_channel_layer().group_send(
        bridge_group(session.id), {"type": "bridge.stdin", "line": line}
    )

    async def configured() -> bool:
        return await _count(session, type="configured", raw__contains="configured-by-test") == 1

    await wait_for(configured)
    await client.send_prompt(sandbox_id, session_id, "exit 0")
    await asyncio.wait_for(task, 30)
    await client.aclose()


def test_it_retries_an_upstream_whose_connections_deliver_within_half_a_second() -> None:
    """Connections cut inside a replay deliver frames but nothing new: the upstream is there,
    and a long wait would only let its ring move past what was read (a gap)."""
    waits = [retry_wait(attempt, delivered=True) for attempt in range(1, 40) for _ in range(20)]
    assert max(waits) <= DELIVERING_BACKOFF_CAP
    assert retry_wait(0, delivered=True) == retry_wait(0, delivered=False) == 0.0


def test_it_backs_off_further_from_an_upstream_that_delivers_nothing() -> None:
    waits = [retry_wait(8, delivered=False) for _ in range(200)]
    assert DELIVERING_BACKOFF_CAP < max(waits) <= BACKOFF_CAP
