"""WebSocket consumers: the live session page and the live session list.

A session viewer says which `seq` it already holds (`{"last_seq": N}`, sent by the page
on every open of the socket); the consumer replays what is missing from the database and
then forwards the fragments the bridge rendered. It tracks the last seq it sent, so each
event reaches the viewer exactly once and in order even when live messages overtake the
replay, arrive twice, or were dropped by a full channel layer (a seq gap triggers a
catch-up from the database).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard.agents import access
from dashboard.agents.models import AgentSession, Event, ShareLink, Watcher
from dashboard.agents.recording import SESSIONS_GROUP, render_state, session_group, user_group
from dashboard.agents.rendering import ToolIndex, render_event_oob
from dashboard.agents.sharing import share_group
from dashboard.daphne_glue import WriteGate

log = logging.getLogger(__name__)

CATCH_UP_CHUNK = 200
MAX_PENDING = 500
WATCHER_TTL = 90  # seconds; a socket refreshes its presence every third of that


@database_sync_to_async
def _viewable_session(user: Any, session_id: str) -> AgentSession | None:
    if user is None or not access.can_view(user):
        return None
    return AgentSession.objects.select_related("sandbox").filter(id=session_id).first()


@database_sync_to_async
def _can_steer(user: Any) -> bool:
    return access.can_steer(user)


@database_sync_to_async
def _link_id(token: str) -> int | None:
    if not token or len(token) > 200:
        return None
    return (
        ShareLink.objects.filter(token_hash=access.hash_token(token))
        .values_list("pk", flat=True)
        .first()
    )


@database_sync_to_async
def _shared_session(token: str) -> tuple[str, int, float | None] | None:
    """The session a live link opens, the link's id, and seconds until it expires."""
    link = access.active_link(token)
    if link is None:
        return None
    remaining = None
    if link.expires_at is not None:
        remaining = (link.expires_at - timezone.now()).total_seconds()
    return str(link.session_id), link.pk, remaining


@database_sync_to_async
def _watch(channel: str, session_id: str, user: Any, link_id: int | None) -> str:
    Watcher.objects.update_or_create(
        channel_name=channel,
        defaults={
            "session_id": session_id,
            "seen_at": timezone.now(),
            "user": user if user is not None and user.is_authenticated else None,
            "share_link_id": link_id,
        },
    )
    return _render_watchers(session_id)


@database_sync_to_async
def _unwatch(channel: str, session_id: str) -> str:
    Watcher.objects.filter(channel_name=channel).delete()
    return _render_watchers(session_id)


@database_sync_to_async
def _still_watching(channel: str) -> None:
    Watcher.objects.filter(channel_name=channel).update(seen_at=timezone.now())


def _render_watchers(session_id: str) -> str:
    fresh = Watcher.objects.filter(
        session_id=session_id, seen_at__gt=timezone.now() - timedelta(seconds=WATCHER_TTL)
    ).select_related("user")
    names = sorted({w.user.get_username() for w in fresh if w.user is not None})
    links = sum(1 for w in fresh if w.user is None)
    return render_to_string(
        "agents/session.html#watchers",
        {"watchers": {"names": names, "links": links}, "oob": True},
    )


@database_sync_to_async
def _render_missing(session_id: str, after: int, limit: int) -> list[tuple[int, str]]:
    session = AgentSession.objects.select_related("sandbox").filter(id=session_id).first()
    if session is None:  # deleted while someone watched: nothing more to send
        return []
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


async def _join_user_group(consumer: AsyncWebsocketConsumer) -> None:
    user = consumer.scope.get("user")
    if user is not None and getattr(user, "pk", None) is not None:
        await consumer.channel_layer.group_add(user_group(user.pk), consumer.channel_name)


async def _leave_user_group(consumer: AsyncWebsocketConsumer) -> None:
    user = consumer.scope.get("user")
    if user is not None and getattr(user, "pk", None) is not None:
        await consumer.channel_layer.group_discard(user_group(user.pk), consumer.channel_name)


class SessionConsumer(AsyncWebsocketConsumer):
    """A team member's session page."""

    can_steer = False
    link_id: int | None = None

    async def authorise(self) -> str | None:
        """The session this socket may watch, or None to refuse it."""
        session_id = str(self.scope["url_route"]["kwargs"]["session_id"])
        user = self.scope.get("user")
        if await _viewable_session(user, session_id) is None:
            return None
        self.can_steer = await _can_steer(user)
        return session_id

    async def connect(self) -> None:
        session_id = await self.authorise()
        if session_id is None:
            await self.close(code=4403)
            return
        self.session_id = session_id
        self.last_seq: int | None = None
        self.pending: list[dict[str, Any]] = []
        self.overflowed = False
        self.group = session_group(self.session_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        self.gate = WriteGate(self.base_send)
        self.delivery = asyncio.Lock()
        self.draining: asyncio.Task[None] | None = None
        await _join_user_group(self)
        self.heartbeat = asyncio.create_task(self._keep_presence())
        watchers = await _watch(
            self.channel_name, self.session_id, self.scope.get("user"), self.link_id
        )
        await self.channel_layer.group_send(
            self.group, {"type": "session.presence", "html": watchers}
        )

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "group"):
            return
        self.heartbeat.cancel()
        if self.draining is not None:
            self.draining.cancel()
        await self.channel_layer.group_discard(self.group, self.channel_name)
        await _leave_user_group(self)
        watchers = await _unwatch(self.channel_name, self.session_id)
        await self.channel_layer.group_send(
            self.group, {"type": "session.presence", "html": watchers}
        )

    async def _keep_presence(self) -> None:
        while True:
            await asyncio.sleep(WATCHER_TTL / 3)
            await _still_watching(self.channel_name)

    async def session_presence(self, message: dict[str, Any]) -> None:
        if self.last_seq is not None:
            await self.send(text_data=message["html"])

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
        # The page was rendered a moment ago: bring its header, controls and watchers up to date.
        await self.session_state(await _current_state(self.session_id))
        await self.send(text_data=await database_sync_to_async(_render_watchers)(self.session_id))

    async def session_events(self, message: dict[str, Any]) -> None:
        await self._dispatch(message)

    async def session_state(self, message: dict[str, Any]) -> None:
        if self.last_seq is None:
            return  # the state is sent in full once the viewer says hello
        fragments = [message["status"] if self.link_id is None else message["status_shared"]]
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
        async with self.delivery:
            if not items or self._falling_behind():
                return  # the database has these; the viewer gets them once it reads again
            if items[0][0] > self.last_seq + 1:
                await self._catch_up_locked(until=items[0][0] - 1)
                if self.last_seq < items[0][0] - 1:
                    return  # the gap is not filled yet: the drain's catch-up sends these too
            await self._send_items(items)

    async def _catch_up(self, until: int | None = None) -> None:
        async with self.delivery:
            await self._catch_up_locked(until)

    async def _catch_up_locked(self, until: int | None = None) -> None:
        """Send what the database has after `last_seq`. Callers hold `self.delivery`: the
        drain task and live messages would otherwise both send the same events."""
        assert self.last_seq is not None
        while until is None or self.last_seq < until:
            if self._falling_behind():
                return
            chunk = await _render_missing(self.session_id, self.last_seq, CATCH_UP_CHUNK)
            if until is not None:
                chunk = [(seq, html) for seq, html in chunk if seq <= until]
            if not chunk:
                return
            await self._send_items(chunk)
            if len(chunk) < CATCH_UP_CHUNK:
                return

    def _falling_behind(self) -> bool:
        """True while the viewer's socket is not draining (Daphne paused our writes).

        Sending on regardless would pile fragments up in the server's send buffer without
        bound (invariant 6). Instead nothing more is sent until it drains; then the viewer
        is caught up from the database, like a reconnect.
        """
        if self.gate.writable and self.draining is None:
            return False
        if self.draining is None:
            self.draining = asyncio.create_task(self._drain())
        return True

    async def _drain(self) -> None:
        await self.gate.wait()
        self.draining = None
        await self._catch_up()

    async def _send_items(self, items: list[tuple[int, str]]) -> None:
        """Send in order what this viewer has not had; `last_seq` only ever grows."""
        assert self.last_seq is not None
        fresh = [(seq, html) for seq, html in items if seq > self.last_seq]
        if not fresh:
            return
        self.last_seq = fresh[-1][0]
        await self.send(text_data="".join(html for _, html in fresh))

    async def user_revoked(self, message: dict[str, Any]) -> None:
        """The person's role or account was taken away: stop watching at once."""
        await self.close(code=4403)


class ShareSessionConsumer(SessionConsumer):
    """A share link's page: one session, read-only, closed when the link is revoked or expires."""

    async def authorise(self) -> str | None:
        token = str(self.scope["url_route"]["kwargs"]["token"])
        # Listen for a revoke before checking the link: a revoke between the two would
        # otherwise never reach this socket.
        link_id = await _link_id(token)
        if link_id is None:
            return None
        self.link_id = link_id
        await self.channel_layer.group_add(share_group(link_id), self.channel_name)
        shared = await _shared_session(token)
        if shared is None:
            await self.channel_layer.group_discard(share_group(link_id), self.channel_name)
            self.link_id = None
            return None
        session_id, _, remaining = shared
        self.can_steer = False
        if remaining is not None:
            self.expiry = asyncio.get_running_loop().call_later(
                max(remaining, 0), lambda: asyncio.ensure_future(self.share_revoked({}))
            )
        return session_id

    async def share_revoked(self, message: dict[str, Any]) -> None:
        await self.close(code=4403)

    async def disconnect(self, code: int) -> None:
        if getattr(self, "expiry", None) is not None:
            self.expiry.cancel()
        if self.link_id is not None:
            await self.channel_layer.group_discard(share_group(self.link_id), self.channel_name)
        await super().disconnect(code)


@database_sync_to_async
def _signed_in(user: Any) -> bool:
    return bool(user is not None and access.can_view(user))


@database_sync_to_async
def _current_rows(ids: frozenset[str]) -> str:
    valid = []
    for value in ids:
        try:
            valid.append(uuid.UUID(value))
        except ValueError:
            continue
    sessions = AgentSession.objects.select_related("sandbox", "started_by").filter(id__in=valid)
    return "".join(
        render_to_string("agents/index.html#row", {"session": session, "oob": True})
        for session in sessions
    )


class SessionListConsumer(AsyncWebsocketConsumer):
    """Status changes for the session list: each message replaces one row out of band.

    The page says which rows it shows (`{"rows": [ids]}`, again after every filter or page
    change); other sessions' rows are not sent, since the page has no place for them.
    """

    rows: frozenset[str] = frozenset()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            message = json.loads(text_data or "")
        except ValueError:
            return
        rows = message.get("rows") if isinstance(message, dict) else None
        if isinstance(rows, list):
            self.rows = frozenset(str(row) for row in rows[:500])
            # Rows may have changed between the page's render (or a lost socket) and now.
            current = await _current_rows(self.rows)
            if current:
                await self.send(text_data=current)

    async def connect(self) -> None:
        if not await _signed_in(self.scope.get("user")):
            await self.close(code=4403)
            return
        await self.channel_layer.group_add(SESSIONS_GROUP, self.channel_name)
        await _join_user_group(self)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(SESSIONS_GROUP, self.channel_name)
        await _leave_user_group(self)

    async def user_revoked(self, message: dict[str, Any]) -> None:
        await self.close(code=4403)

    async def sessions_row(self, message: dict[str, Any]) -> None:
        if message.get("session") in self.rows:
            await self.send(text_data=message["html"])

    async def sessions_new(self, message: dict[str, Any]) -> None:
        await self.send(text_data=render_to_string("agents/index.html#new-sessions-oob", {}))
