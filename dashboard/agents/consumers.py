"""WebSocket consumers: the live session page and the live session list.

A session page's consumer is glue: it checks who may watch, joins its worker's feed of the
session (`fanout.py`: one channel-layer subscription per session per worker, one frame for
all local viewers), and feeds a `viewers.Cursor` with what happens — the page's hello
(`{"last_seq": N}`, on every open of the socket) and acknowledgements (`{"ack": N}`), live
batches, catch-up results from the database — sending what the cursor says to send. Every
event reaches the page exactly once and in order, and a page that stops acknowledging stops
receiving, then is caught up from the database once it reads again. Presence (who watches)
lives in `presence.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import nullcontext
from typing import Any, cast

from asgiref.typing import WebSocketReceiveEvent
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard.agents import access, viewers
from dashboard.agents.fanout import Feed, Hub, hub_for
from dashboard.agents.models import AgentSession, Event, ShareLink
from dashboard.agents.recording import SESSIONS_GROUP, live_layer, user_group
from dashboard.agents.rendering import ToolIndex, render_event_oob
from dashboard.agents.rendering.porthole import for_link_holders
from dashboard.agents.sharing import share_group
from dashboard.agents.viewers import Batch, Cursor, Item, StateFrames

log = logging.getLogger(__name__)


_viewable_session = database_sync_to_async(access.viewable_session)


@database_sync_to_async
def _link_id(token: str) -> int | None:
    if not access.plausible_token(token):
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
def _render_missing(session_id: str, after: int, limit: int, *, shared: bool) -> list[Item]:
    """Events past `after` from the database, for a team member or (`shared`) a link holder;
    not those its bridge has stored and not yet drawn: they come live, drawn once for all
    (rendering them here, for each viewer that catches up, slowed a flood's viewers
    threefold)."""
    session = AgentSession.objects.select_related("sandbox").filter(id=session_id).first()
    if session is None:  # deleted while someone watched: nothing more to send
        return []
    found = Event.objects.filter(session=session, seq__gt=after)
    if session.undrawn_from is not None:
        found = found.filter(seq__lt=session.undrawn_from)
    events = list(found.select_related("actor").order_by("seq")[:limit])
    tools = ToolIndex.for_session(session, events)
    rendered = []
    with for_link_holders() if shared else nullcontext():
        for event in events:
            event.session = session
            rendered.append((event.seq, render_event_oob(event, tools)))
    return rendered


async def _join_user_group(consumer: AsyncWebsocketConsumer) -> None:
    user = consumer.scope.get("user")
    if user is not None and getattr(user, "pk", None) is not None:
        await consumer.channel_layer.group_add(user_group(user.pk), consumer.channel_name)


async def _leave_user_group(consumer: AsyncWebsocketConsumer) -> None:
    user = consumer.scope.get("user")
    if user is not None and getattr(user, "pk", None) is not None:
        await consumer.channel_layer.group_discard(user_group(user.pk), consumer.channel_name)


def _seq(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class SessionConsumer(AsyncWebsocketConsumer):
    """A team member's session page.

    It has no channel of its own (an alias no layer is configured under: Channels then
    gives a consumer none), so a socket costs the layer nothing to open, keep or close:
    live messages come through this worker's feed of the session, revocations through its
    relays of the person's and the link's groups (`fanout.Hub`).
    """

    channel_layer_alias = "porthole.session-sockets-have-no-channel"
    can_steer = False
    link_id: int | None = None
    feed: Feed | None = None
    followed: tuple[str, ...] = ()
    pending_send: asyncio.Task[None] | None = None  # referenced while it waits

    @staticmethod
    def hub() -> Hub:
        return hub_for(get_channel_layer(), live_layer())

    async def follow(self, group: str) -> None:
        """Messages sent to `group` reach this socket's handlers once this returns."""
        await self.hub().follow(group, self)
        self.followed += (group,)

    async def unfollow(self, group: str) -> None:
        self.followed = tuple(name for name in self.followed if name != group)
        await self.hub().unfollow(group, self)

    async def authorise(self) -> str | None:
        """The session this socket may watch, or None to refuse it."""
        session_id = str(self.scope["url_route"]["kwargs"]["session_id"])
        user = self.scope.get("user")
        found = await _viewable_session(user, session_id)
        if found is None:
            return None
        self.can_steer = found[1].steer
        return session_id

    async def connect(self) -> None:
        self.channel_name = f"viewer.{uuid.uuid4().hex}"  # its name among the watchers
        user = self.scope.get("user")
        if user is not None and getattr(user, "pk", None) is not None:
            # Before the check: a revocation between the two still reaches this socket.
            await self.follow(user_group(user.pk))
        session_id = await self.authorise()
        if session_id is None:
            await self.close(code=4403)
            return
        self.session_id = session_id
        self.cursor = Cursor(window=viewers.WINDOW, chunk=viewers.CHUNK)
        self.sending = asyncio.Lock()
        self.catching_up: asyncio.Task[None] | None = None
        # Subscribed before the page's hello, so that nothing falls between its catch-up
        # and the live messages.
        self.feed = await self.hub().join(session_id, self)
        await self.accept()
        self.feed.presence.arrive(self.channel_name, self.scope.get("user"), self.link_id)

    async def disconnect(self, code: int) -> None:
        for group in self.followed:
            await self.unfollow(group)
        feed, self.feed = self.feed, None
        if feed is None:
            return
        if self.catching_up is not None:
            self.catching_up.cancel()
        feed.presence.leave(self.channel_name)  # before the feed may stop (it writes it then)
        await self.hub().leave(self.session_id, self)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """A frame from the page is handled here without Channels' database hygiene, which
        hops to a thread before every message (`close_old_connections`): a hello or an
        acknowledgement touches no database, and a catch-up it starts reaches the database
        through `database_sync_to_async`, which does its own. With 300 viewers each
        acknowledging every second, the hops were 8 % of a web worker's CPU."""
        if message["type"] == "websocket.receive":
            await self.websocket_receive(cast(WebSocketReceiveEvent, message))
        else:
            await super().dispatch(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            message = json.loads(text_data or "")
        except (ValueError, RecursionError):  # RecursionError: JSON nested past the stack
            return
        if not isinstance(message, dict) or self.feed is None:
            return  # steering is plain POSTs: only the hello and acknowledgements come here
        if "last_seq" in message and not self.cursor.greeted:
            self.cursor.hello(_seq(message["last_seq"]) or 0, self.feed.latest)
        elif (acked := _seq(message.get("ack"))) is not None:
            self.cursor.ack(acked)
        self._catch_up_soon()

    # -- what the feed hands over (the same objects for every viewer of this worker) --------

    async def live_events(self, batch: Batch) -> None:
        if self.sending.locked():
            self.cursor.skip(batch)  # a send is under way: the catch-up brings these too
        else:
            text = self.cursor.offer(batch)
            if text:
                self._send_without_waiting(text)
        self._catch_up_soon()

    async def live_state(self, frames: StateFrames) -> None:
        self._send_state_without_waiting(self._state_frame(frames))

    async def live_presence(self, watchers: dict[str, str]) -> None:
        self._send_state_without_waiting(self._watchers_frame(watchers))

    async def missed(self) -> None:
        self.cursor.missed()
        self._catch_up_soon()

    def _state_frame(self, frames: StateFrames) -> str:
        return frames.frame(shared=self.link_id is not None, steer=self.can_steer)

    def _watchers_frame(self, watchers: dict[str, str]) -> str:
        return watchers["html" if self.link_id is None else "shared"]

    def _send_state_without_waiting(self, frame: str) -> None:
        if self.sending.locked():
            self.cursor.defer_state()  # sent with the others once the socket takes frames
            self._catch_up_soon()
        elif self.cursor.offer_state():
            self._send_without_waiting(frame)

    def _send_without_waiting(self, frame: str) -> None:
        """Send `frame` now if the socket takes it, and never make the feed wait if it does
        not: the feed hands each frame to its viewers one after another, and uvicorn's
        `send` waits while a socket's buffer is full (a viewer that stopped reading). The
        send runs eagerly, so a socket that takes it costs no task switch; until a send
        that had to wait is through, live frames are skipped (`Cursor.skip`) and caught up
        from the database (invariant 6)."""
        loop = asyncio.get_running_loop()
        self.pending_send = asyncio.Task(self._send_frame(frame), loop=loop, eager_start=True)

    async def _send_frame(self, frame: str) -> None:
        async with self.sending:
            try:
                await self.send(text_data=frame)
            except OSError:  # the socket went meanwhile: its disconnect cleans up
                log.debug("session %s: a viewer's socket went before a frame", self.session_id)
            except Exception:  # one broken socket must not cost the others their updates
                log.exception("session %s: a viewer failed to take a frame", self.session_id)

    async def _send_state(self, frame: str) -> None:
        """For the catch-up task, which may wait for the socket."""
        if self.cursor.offer_state():
            async with self.sending:
                await self.send(text_data=frame)

    # -- catching up from the database --------------------------------------------------------

    def _catch_up_soon(self) -> None:
        if (self.catching_up is None or self.catching_up.done()) and self.cursor.wants_catch_up:
            self.catching_up = asyncio.create_task(self._catch_up())

    async def _catch_up(self) -> None:
        """Send what the database has past what the page holds, within the window; then,
        once level with the live stream, the header, controls and watchers as they are.
        Runs until nothing more is due (live batches may ask for more meanwhile)."""
        while True:
            query = self.cursor.fetch()
            if query is not None:
                after, limit = query
                try:
                    items = await _render_missing(
                        self.session_id, after, limit, shared=self.link_id is not None
                    )
                except BaseException:
                    self.cursor.abandon()
                    raise
                async with self.sending:
                    text = self.cursor.fetched(items, limit)
                    if text:
                        await self.send(text_data=text)
            elif self.cursor.refresh_state() and self.feed is not None:
                # The page was rendered (or fell behind) a moment ago: bring it up to date.
                state = await self.feed.state()
                watchers = await self.feed.watchers()
                if state is not None:
                    await self._send_state(self._state_frame(state))
                await self._send_state(self._watchers_frame(watchers))
            else:
                return

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
        await self.follow(share_group(link_id))
        shared = await _shared_session(token)
        if shared is None:
            await self.unfollow(share_group(link_id))
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
        except (ValueError, RecursionError):  # RecursionError: JSON nested past the stack
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
