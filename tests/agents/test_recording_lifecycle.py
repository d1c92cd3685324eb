"""A session's record from its first byte to its end: started through Porthole with a
bridge attached first, kept while the upstream is away, marked lost only when the
upstream says so (and which part is gone), attachable again; control acknowledged."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.test import AsyncClient
from django.urls import reverse
from django.utils import timezone

from dashboard.agents import actions
from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.supervisor import BridgeSupervisor
from dashboard.opencomputer import OpenComputer
from tests.agents.helpers import wait_for
from tests.agents.test_bridge_faults import assert_whole_flood, figures, flood_indices, through
from tests.proxy import CuttableProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

OWNER = "lifecycle-worker"


@database_sync_to_async
def _new_session(sandbox_id: str, session_id: str, *, leased: bool = True) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=sandbox_id)
    lease = {"bridge_owner": OWNER, "bridge_lease_until": timezone.now() + timedelta(seconds=60)}
    return AgentSession.objects.create(
        sandbox=sandbox, upstream_id=session_id, **(lease if leased else {})
    )


@database_sync_to_async
def _events(session: AgentSession, **filters: object) -> list[dict[str, object]]:
    rows = Event.objects.filter(session=session, **filters).order_by("seq")
    return [json.loads(raw) for raw in rows.values_list("raw", flat=True)]


@database_sync_to_async
def _reload(session: AgentSession) -> AgentSession:
    return AgentSession.objects.select_related("sandbox").get(id=session.id)


async def _status(session: AgentSession) -> str:
    return (await _reload(session)).status


async def test_it_records_from_the_first_byte_however_much_the_agent_prints_at_once(oc, alice):
    """Issue 7: the agent got its prompt before the bridge connected, and output past the
    ring in that first moment was gone. Now the prompt goes through the attached bridge."""
    supervisor = BridgeSupervisor("first-byte-worker")
    running = asyncio.create_task(supervisor.run())
    try:
        await wait_for(lambda: database_sync_to_async(_workers_alive)())
        count = 6000  # ~2 MB, printed as fast as the agent can: two rings' worth
        session = await actions.start_session(
            alice, prompt=f"flood {count} 300\nexit 0", options={}
        )

        async def exited() -> bool:
            return await _status(session) == AgentSession.Status.EXITED

        await wait_for(exited, 90)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    notes = await _events(session, source=Event.Source.BRIDGE)
    found = await flood_indices(session)
    gaps = len([n for n in notes if n["type"] == "gap"])
    figures("start with a flood of two rings", found, count, gaps=gaps)
    assert [note["type"] for note in notes] == ["exit"], notes
    assert (await _events(session, source=Event.Source.AGENT))[0]["type"] == "ready"
    assert_whole_flood(await flood_indices(session), count)
    notices = await _events(session, type="notice")
    assert notices == [], notices  # the bridge took the first prompt


def _workers_alive() -> bool:
    from dashboard.agents.leases import workers_alive

    return workers_alive()


async def test_it_keeps_trying_while_the_upstream_is_unreachable(oc):
    """Issue 7: "lost" was final after 5 minutes without the upstream. Now only the
    upstream saying the session or sandbox is gone ends recording."""
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="hello\nsleep 3\nbye\nexit 0")
    session = await _new_session(sandbox.sandbox_id, agent.session_id)
    target = urlsplit(oc.api_url)
    proxy = await RefusingProxy(target.hostname or "127.0.0.1", target.port or 80).start()
    proxy.refuse = True
    task = asyncio.create_task(Bridge(str(session.id), OWNER, open_stream=through(proxy, oc)).run())

    async def refused_often() -> bool:
        return proxy.refused >= 4

    await wait_for(refused_often, 60)
    assert await _status(session) != AgentSession.Status.LOST
    proxy.refuse = False
    await asyncio.wait_for(task, 60)
    await proxy.close()

    fresh = await _reload(session)
    assert (fresh.status, fresh.exit_code) == (AgentSession.Status.EXITED, 0)
    texts = [
        block.get("text")
        for event in await _events(session, type="assistant")
        for block in event["message"]["content"]  # type: ignore[index]
    ]
    assert "hello" in texts and "bye" in texts
    assert await _events(session, source=Event.Source.BRIDGE, type="gap") == []
    await client.aclose()


class RefusingProxy(CuttableProxy):
    """A proxy that, while `refuse` is set, drops every connection at once (a network that
    cannot reach the sandbox server); otherwise passes through."""

    refuse = False
    refused = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            self.refused += 1
            if writer.transport is not None:
                writer.transport.abort()
            return
        await super()._handle(reader, writer)


async def test_it_marks_lost_only_when_the_upstream_says_which_part_is_gone(oc):
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="sleep 30")
    session = await _new_session(sandbox.sandbox_id, agent.session_id)
    await client.kill_sandbox(sandbox.sandbox_id)

    async def gone() -> bool:
        try:
            await client.get_sandbox(sandbox.sandbox_id)
        except Exception:
            return True
        return False

    await wait_for(gone, 30)
    await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 30)
    assert await _status(session) == AgentSession.Status.LOST
    (lost,) = await _events(session, type="lost")
    assert lost["gone"] == "sandbox"
    await client.aclose()


async def test_it_attaches_a_lost_session_again(oc, alice):
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="hi\nsleep 2\nexit 5")
    session = await _new_session(sandbox.sandbox_id, agent.session_id, leased=False)
    await AgentSession.objects.filter(id=session.id).aupdate(
        status=AgentSession.Status.LOST, ended_at=timezone.now()
    )

    again = await actions.attach(alice, sandbox.sandbox_id, agent.session_id)
    assert again.id == session.id and again.is_live
    supervisor = BridgeSupervisor("reattach-worker")
    assert await supervisor.tick() == [str(session.id)]
    await asyncio.wait_for(supervisor.bridges[str(session.id)], 30)
    fresh = await _reload(session)
    assert (fresh.status, fresh.exit_code) == (AgentSession.Status.EXITED, 5)
    assert [e["type"] for e in await _events(session, source=Event.Source.DASHBOARD)] == ["attach"]
    await supervisor.stop()
    await client.aclose()


async def _signed_in(user: User) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def test_it_shows_and_records_a_configure_no_bridge_took(oc, alice):
    """Issue 7: a configure sent while no bridge held the session was shown as sent and
    attributed, but never reached the agent, and no failure was recorded."""
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="hello")
    session = await _new_session(sandbox.sandbox_id, agent.session_id, leased=False)
    await AgentSession.objects.filter(id=session.id).aupdate(status=AgentSession.Status.IDLE)

    web = await _signed_in(alice)
    response = await web.post(
        reverse("session_configure", args=[session.id]),
        {"model": "other-model"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 503
    assert "Not connected to the agent" in response.content.decode()
    (failed,) = await _events(session, type="action_failed")
    assert failed["action"] == "configure"
    assert await Event.objects.filter(session=session, type="action_failed", actor=alice).aexists()
    await client.kill_sandbox(sandbox.sandbox_id)
    await client.aclose()


async def test_it_acknowledges_a_configure_the_bridge_wrote_to_the_agent(oc, alice):
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="hello")
    session = await _new_session(sandbox.sandbox_id, agent.session_id)
    task = asyncio.create_task(Bridge(str(session.id), OWNER).run())

    async def idle() -> bool:
        return await _status(session) == AgentSession.Status.IDLE

    await wait_for(idle)
    web = await _signed_in(alice)
    response = await web.post(
        reverse("session_configure", args=[session.id]),
        {"model": "configured-by-alice"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200, response.content.decode()[:500]
    assert "Configuration sent" in response.content.decode()

    async def configured() -> bool:
        answers = await _events(session, type="configured")
        return any("configured-by-alice" in json.dumps(a) for a in answers)

    await wait_for(configured)
    assert await _events(session, type="action_failed") == []
    await client.send_prompt(sandbox.sandbox_id, agent.session_id, "exit 0")
    await asyncio.wait_for(task, 30)
    await client.aclose()


async def test_it_warns_on_the_page_when_nothing_records_a_live_session(alice, caplog):
    """Issue 9: served by plain web workers with no bridges worker, a started session stayed
    "working" with no event, no warning and no log line."""
    session = await _new_session("sb-unbridged", "ses-unbridged", leased=False)
    await AgentSession.objects.filter(id=session.id).aupdate(
        status=AgentSession.Status.WORKING, started_at=timezone.now() - timedelta(seconds=60)
    )
    web = await _signed_in(alice)
    page = (await web.get(reverse("session", args=[session.id]))).content.decode()
    assert "Nothing is recording this session" in page
    assert any("no bridge recording it" in r.getMessage() for r in caplog.records)

    await AgentSession.objects.filter(id=session.id).aupdate(
        bridge_owner="w", bridge_lease_until=timezone.now() + timedelta(seconds=10)
    )
    page = (await web.get(reverse("session", args=[session.id]))).content.decode()
    assert "Nothing is recording this session" not in page
