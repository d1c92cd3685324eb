"""What makes recording a flood cheap (issue 11), as mechanisms rather than timings: the
bridge keeps one database connection across its batches, a batch formats its time once,
plain text skips the markdown parser yet reads the same, rows go in with one statement per
batch, and a page load reuses the fragment stored with each event instead of rendering the
event a second time."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext
from channels.db import database_sync_to_async
from django.db import connection, connections
from django.db.backends.signals import connection_created
from django.utils import timezone

from dashboard.agents import bridge
from dashboard.agents.bridge import Bridge, on_bridge_thread
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.opencomputer import OpenComputer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

OWNER = "throughput-worker"


@database_sync_to_async
def _new_session(sandbox_id: str, session_id: str) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=sandbox_id)
    return AgentSession.objects.create(
        sandbox=sandbox,
        upstream_id=session_id,
        bridge_owner=OWNER,
        bridge_lease_until=timezone.now() + timedelta(seconds=60),
    )


@database_sync_to_async
def _created_at_count(session: AgentSession) -> tuple[int, int]:
    """(events, distinct transactions): each batch stamps its events with one time."""
    rows = Event.objects.filter(session=session)
    return rows.count(), rows.values("created_at").distinct().count()


async def test_it_keeps_one_database_connection_across_a_floods_batches(oc):
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="flood 1500 100\nexit 0")
    session = await _new_session(sandbox.sandbox_id, agent.session_id)
    opened: list[Any] = []

    def count(**kwargs: Any) -> None:
        opened.append(kwargs["connection"])

    connection_created.connect(count, weak=False)
    try:
        await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 60)
    finally:
        connection_created.disconnect(count)
        await client.aclose()
    events, batches = await _created_at_count(session)
    assert events >= 1500
    assert batches >= 10, "the flood should have been stored in many batches"
    assert len(opened) == 1, f"{len(opened)} connections for {batches} batches"


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite cannot tell a closed handle (is_usable)"
)
async def test_it_replaces_a_kept_connection_that_died_while_idle(monkeypatch):
    monkeypatch.setattr(bridge, "IDLE_CHECK_SECONDS", 0.0)

    def drop_underneath() -> None:
        connection.ensure_connection()
        assert connection.connection is not None
        connection.connection.close()  # as a server restart or an idle timeout would

    async with ThreadSensitiveContext():
        count = on_bridge_thread(Event.objects.count)
        await count()
        await on_bridge_thread(drop_underneath)()
        assert await count() == 0
        await on_bridge_thread(connections.close_all)()
