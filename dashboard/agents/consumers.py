"""WebSocket consumers: the live session page and the live session list.

A session viewer says which `seq` it already holds (`{"last_seq": N}`, sent by the page
on every open of the socket); the consumer replays what is missing from the database and
then forwards the fragments the bridge rendered. It tracks the last seq it sent, so each
event reaches the viewer exactly once and in order even when live messages overtake the
replay, arrive twice, or were dropped by a full channel layer (a seq gap triggers a
catch-up from the database).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import SESSIONS_GROUP, render_state, session_group
from dashboard.agents.rendering import ToolIndex, render_event_oob

log = logging.getLogger(__name__)

CATCH_UP_CHUNK = 200
MAX_PENDING = 500


@database_sync_to_async
def _viewable_session(user: Any, session_id: str) -> AgentSession | None:
    if user is None or not user.is_authenticated:
        return None
    return AgentSession.objects.select_related("sandbox").filter(id=session_id).first()


@database_sync_to_async
def _render_missing(session_id: str, after: int, limit: int) -> list[tuple[int, str]]:
    session = AgentSession.objects.select_related("sandbox").get(id=session_id)
    events = list(
        Event.objects.filter(session=session, seq__gt=after)
        .select_related("actor")
        .order_by("seq")[:limit]
    )
    tools = ToolIndex.for_session(session, events)
    rendered = []
    for event in events:
        event.session = session
        rendered.append((event.seq, render_event_oob(event, tools)))
    return rendered


@database_sync_to_async
def _current_state(session_id: str) -> dict[str, str]:
    return render_state(AgentSession.objects.select_related("sandbox").get(id=session_id))


class SessionConsumer(AsyncWebsocketConsumer):
    can_steer = True

    async def connect(self) -> None:
        self.session_id = str(self.scope["url_route"]["kwargs"]["session_id"])
        session = await _viewable_session(self.scope.get("user"), self.session_id)
        if session is None:
            await self.close(code=4403)
            return
        self.last_seq: int | None = None
        self.pending: list[dict[str, Any]] = []
        self.overflowed = False
        self.group = session_group(self.session_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            message = json.loads(text_data or "")
        except ValueError:
            return
        if not isinstance(message, dict) or self.last_seq is not None:
            return  # only the opening `last_seq` is listened to; steering is plain POSTs
        held = message.get("last_seq")
        self.last_seq = held if isinstance(held, int) and held >= 0 else 0
        await self._catch_up()
        pending, self.pending = self.pending, []
        for queued in pending:
            await self._dispatch(queued)
        if self.overflowed:
            self.overflowed = False
            await self._catch_up()
        # The page was rendered a moment ago: bring its header and controls up to date.
        await self.session_state(await _current_state(self.session_id))

    async def session_events(self, message: dict[str, Any]) -> None:
        await self._dispatch(message)

    async def session_state(self, message: dict[str, Any]) -> None:
        if self.last_seq is None:
            return  # the state is sent in full once the viewer says hello
        fragments = [message["status"]]
        if self.can_steer:
            fragments.append(message["controls"])
        await self.send(text_data="".join(fragments))

    async def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "session.events":
            await self.session_state(message)
            return
        if self.last_seq is None:
            if len(self.pending) < MAX_PENDING:
                self.pending.append(message)
            else:
                self.overflowed = True
            return
        items: list[tuple[int, str]] = [tuple(item) for item in message["items"]]  # type: ignore[misc]
        if items and items[0][0] > self.last_seq + 1:
            await self._catch_up(until=items[0][0] - 1)
        fresh = [(seq, html) for seq, html in items if seq > self.last_seq]
        if fresh:
            await self._send_items(fresh)

    async def _catch_up(self, until: int | None = None) -> None:
        assert self.last_seq is not None
        while until is None or self.last_seq < until:
            chunk = await _render_missing(self.session_id, self.last_seq, CATCH_UP_CHUNK)
            if until is not None:
                chunk = [(seq, html) for seq, html in chunk if seq <= until]
            if not chunk:
                return
            await self._send_items(chunk)
            if len(chunk) < CATCH_UP_CHUNK:
                return

    async def _send_items(self, items: list[tuple[int, str]]) -> None:
        self.last_seq = items[-1][0]
        await self.send(text_data="".join(html for _, html in items))


@database_sync_to_async
def _signed_in(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated)


class SessionListConsumer(AsyncWebsocketConsumer):
    """Status changes for the session list: each message replaces one row out of band."""

    async def connect(self) -> None:
        if not await _signed_in(self.scope.get("user")):
            await self.close(code=4403)
            return
        await self.channel_layer.group_add(SESSIONS_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(SESSIONS_GROUP, self.channel_name)

    async def sessions_row(self, message: dict[str, Any]) -> None:
        await self.send(text_data=message["html"])

    async def sessions_new(self, message: dict[str, Any]) -> None:
        await self.send(text_data=render_to_string("agents/index.html#new-sessions-oob", {}))
