"""A session that sits idle past the threshold shows "needs attention" live: time passing is
no event, so the bridge holding the session looks again when the threshold passes."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import SESSIONS_GROUP, live_layer, session_group
from dashboard.opencomputer import OpenComputer
from tests.agents.helpers import held_session, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

OWNER = "idle-test-worker"
IDLE_SECONDS = 2.0

_new_session = functools.partial(held_session, owner=OWNER, lease_seconds=60, title="Idle one")


class Listener:
    """A channel in a group, as a viewer's consumer would be, keeping what it is sent."""

    def __init__(self, layer: Any, group: str) -> None:
        self.layer, self.group = layer, group
        self.received: list[dict[str, Any]] = []

    async def __aenter__(self) -> Listener:
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.layer.group_discard(self.group, self.channel)

    async def until(self, condition: Any, timeout: float) -> dict[str, Any]:
        async def first() -> dict[str, Any]:
            while True:
                message = await self.layer.receive(self.channel)
                self.received.append(message)
                if condition(message):
                    return message

        return await asyncio.wait_for(first(), timeout)


@database_sync_to_async
def _status(session: AgentSession) -> str:
    return AgentSession.objects.get(pk=session.pk).status


@database_sync_to_async
def _turn_completed(session: AgentSession) -> bool:
    return Event.objects.filter(session=session, type="turn_complete").exists()


def _noted(message: dict[str, Any]) -> bool:
    return message["type"] == "session.state" and "attention-note" in message["status"]


async def test_it_shows_the_idle_note_live_once_the_threshold_passes(oc, settings):
    settings.PORTHOLE_ATTENTION_IDLE_MINUTES = IDLE_SECONDS / 60
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="one turn")
    session = await _new_session(sandbox.sandbox_id, agent.session_id)
    bridge = asyncio.create_task(Bridge(str(session.id), OWNER).run())
    try:
        async with (
            Listener(live_layer(), session_group(session.id)) as page,
            Listener(get_channel_layer(), SESSIONS_GROUP) as listing,
        ):
            await wait_for(lambda: _turn_completed(session))
            # The turn's end redraws the header, without the note: it is not idle for long yet.
            state = await page.until(_noted, timeout=IDLE_SECONDS * 10)
            assert "idle after a turn, nobody followed up" in state["status"]
            assert "Needs attention" not in state["status_shared"]  # link holders learn nothing
            assert "attention-note" not in "".join(m.get("status", "") for m in page.received[:-1])
            row = await listing.until(
                lambda m: m["type"] == "sessions.row" and "needs attention" in m["html"],
                timeout=IDLE_SECONDS * 5,
            )
            assert row["session"] == str(session.id)
            assert await _status(session) == AgentSession.Status.IDLE
            # Said once: nothing more until something changes.
            with pytest.raises(TimeoutError):
                await page.until(_noted, timeout=IDLE_SECONDS * 1.5)
    finally:
        await client.send_prompt(sandbox.sandbox_id, agent.session_id, "exit 0")
        await asyncio.wait_for(bridge, 30)
        await client.aclose()
