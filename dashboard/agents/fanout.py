"""Fan-out: one subscription per watched session per worker, one frame for all its viewers.

A session's messages (`session.events`, `session.state`, `session.presence`) are sent to the
session's group on the live streams' channel layer (`recording.LIVE_LAYER`: Redis pub/sub
in a team deployment). What is in that group is not every viewer's socket but one channel
per worker process that has viewers of the session (a `Feed`). The feed reads each message
once, builds its frame once (`viewers.Batch`, `viewers.StateFrames`) and hands the very
same string to each of its local viewers, which decide for themselves whether to send it
(`viewers.Cursor`). The channel layer thus carries and copies one message per worker, not
per viewer; a viewer that cannot take a frame skips it and catches up from the database.

That layer delivers at most once, and the database is the record: a feed looks every
`VERIFY_EVERY` seconds whether what was stored and announced has come, and if not, its
viewers catch up.

A hand-out to hundreds of viewers that took long, or that took most of the time since the
previous one began, is followed by a pause as long; messages that come meanwhile are handed
out together, consecutive event batches as one frame, so each viewer's socket takes one
write for all of them. The more viewers, the fewer frames per event; with fewer viewers
each message goes out as it comes.

The feed also knows the session's last seq (read once after subscribing, then from the
live stream): a page whose hello says it holds that needs no catch-up query.

A session page's socket has no channel of its own: what is addressed to a person's or a
link's sockets (`user.<id>`, `share.<id>`: revocations) reaches them through a `Relay`, one
member of that group per worker, so opening or closing a viewer costs the layer nothing.

(Over 400 lines: feeds, relays and the hub that keeps both are one lifecycle, a worker's
subscriptions joined and left with its sockets, and read best together.)

Nothing here awaits a slow viewer: a consumer sends a live frame without waiting for the
socket (`SessionConsumer._send_without_waiting`), and a viewer that has to query the
database does so in a task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from typing import Any, Protocol

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async

from dashboard.agents.models import AgentSession
from dashboard.agents.presence import INTERVAL, REFRESH, Coalescer, Presence
from dashboard.agents.recording import render_state, session_group
from dashboard.agents.viewers import Batch, StateFrames
from dashboard.metrics import LAYER_DROPS, VIEWERS_HERE

log = logging.getLogger(__name__)

# channels-redis forgets group members after a day; a long-lived feed joins again hourly.
REJOIN_EVERY = 3600.0
# A hand-out that took longer (seconds) is followed by a pause as long (`Feed._busy`):
# about 250 viewers on two busy cores. Without one, a worker falls behind for good (300
# viewers, events published without recording: 22 events/s instead of 200). Shorter ones
# are followed by a pause too when they took more than `BUSY_SHARE` of the time since the
# previous one began: hand-outs of 9 ms every 5 ms overload a worker as surely (300
# viewers' p99 in `bench/fanout.py --prerecorded` went 110 → 240 ms when each got cheaper
# and fell under this threshold). Sparse short hand-outs are not followed by one: it would
# only add latency (100 viewers: p99 ×2). At half, 300 viewers' 3 ms hand-outs every 5 ms
# were paused after every other one for nothing: at three quarters their p50 halved
# (6.7–7.0 → 3.5–3.8 ms), their p99 stayed within its spread, for 0.45 ms more CPU an
# event, fewer events sharing a frame (docs/benchmarks.md, sixteenth round).
PAUSE_AFTER = 0.010
BUSY_SHARE = 0.75
# The live layer delivers at most once: Redis pub/sub drops what is published while a
# worker's subscription reconnects, and any layer drops past its capacity. So each feed
# looks at its session's last seq this often: what was stored before the previous look and
# has still not come through the layer was lost, and the viewers catch up from the database
# (within twice this, however quiet the session is after it). One query a look for all of a
# worker's feeds (`Hub._verify`), however many sessions it follows.
VERIFY_EVERY = 2.0
_pause = asyncio.sleep
_clock = time.perf_counter
_until_next_look = asyncio.sleep  # `Feed._verify`'s wait (tests take each look in turn)


def _stored_seqs(session_ids: list[str]) -> dict[str, int]:
    """Each session's last seq stored and announced (those that exist): a bridge that fell
    behind stores first and announces after (`AgentSession.undrawn_from`), and what it has
    yet to announce has not been lost."""
    rows = AgentSession.objects.filter(id__in=session_ids).values_list(
        "id", "next_seq", "undrawn_from"
    )
    return {str(id_): (undrawn or next_seq) - 1 for id_, next_seq, undrawn in rows}


_latest_seqs = database_sync_to_async(_stored_seqs)  # a worker's look at all its sessions


@database_sync_to_async
def _latest_seq(session_id: str) -> int | None:
    return _stored_seqs([session_id]).get(session_id)


@database_sync_to_async
def _current_state(session_id: str) -> dict[str, str] | None:
    session = AgentSession.objects.select_related("sandbox").filter(id=session_id).first()
    return None if session is None else render_state(session)


def _for_link_holders(batch: Batch, shared: list[Any] | None) -> Batch:
    """The batch as share-link holders get it: Porthole's own events in their rendering that
    names nobody (`recording.record`), the agent's events the very same strings. It stops
    before an event whose such rendering failed: the holder then catches up from the
    database, which renders it again, never with the member's version."""
    if not shared:
        return batch
    overrides = {int(seq): html for seq, html in shared}
    items = []
    for seq, html in batch.items:
        if seq in overrides:
            html = overrides[seq]
            if html is None:
                break
        items.append((seq, html))
    return Batch(tuple(items))


def _joinable(batch: Batch, shared: Batch, following: Batch) -> bool:
    """Whether `following` may join the pending frame: it continues it with no gap, and the
    link holders' version was not cut short (joining then would hide a gap from them)."""
    return batch.continued_by(following) and len(shared.items) == len(batch.items)


def _join(batch: Batch, shared: Batch, more: Batch, more_shared: Batch) -> tuple[Batch, Batch]:
    joined = batch.joined(more)
    if shared is batch and more_shared is more:  # nothing differs for link holders
        return joined, joined
    return joined, shared.joined(more_shared)


class Viewer(Protocol):
    channel_name: str
    link_id: int | None  # a share link's holder (who learns no teammate's name) when set

    async def live_events(self, batch: Batch) -> None: ...

    async def live_state(self, frames: StateFrames) -> None: ...

    async def live_presence(self, watchers: dict[str, str]) -> None: ...

    async def missed(self) -> None: ...


class GroupMember:
    """This worker's one channel in a channel-layer group, shared by its local sockets:
    subscribed once (`ready` waits for it), read by `_read`, kept alive by `_keep`."""

    def __init__(self, layer: Any, group: str) -> None:
        self.layer = layer
        self.group = group
        self.channel = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._started: asyncio.Task[None] = asyncio.create_task(self._start())

    async def _start(self) -> None:
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, self.channel)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._keep())]
        await self._subscribed()

    async def _subscribed(self) -> None:
        """What to do once messages sent to the group reach this channel."""

    async def ready(self) -> None:
        """Returns once messages sent to the group reach this member."""
        await asyncio.shield(self._started)

    async def stop(self) -> None:
        try:
            await asyncio.shield(self._started)
        finally:
            for task in self._tasks:
                task.cancel()
            if self.channel:
                await self.layer.group_discard(self.group, self.channel)

    async def _read(self) -> None:
        raise NotImplementedError

    async def _keep(self) -> None:
        raise NotImplementedError


class Feed(GroupMember):
    """This worker's subscription to one session, shared by its local viewers."""

    def __init__(self, layer: Any, session_id: str) -> None:
        self.session_id = session_id
        self.viewers: dict[Viewer, None] = {}  # an ordered set
        self.presence = Presence(session_id, self._announce)
        self.batches = 0  # frames built (tests): at most one per message, whatever the viewers
        self.latest: int | None = None  # the session's last seq, once known
        self.pauses = 0  # pauses after busy hand-outs, for the tests
        self._last_hand_out = -math.inf  # when the last hand-out began (`_clock`)
        self._inbox: list[dict[str, Any]] = []  # what came during a pause and after it
        self._resuming: asyncio.Task[None] | None = None  # the pause, then the inbox
        self._latest_watchers: dict[str, str] | None = None
        self._latest_state: StateFrames | None = None
        self._expected: int | None = None  # the last seq stored, as of the previous look
        self._state_version = 0
        self._rendering = asyncio.Lock()
        self._rendering_state = asyncio.Lock()
        self._deliveries = Coalescer(INTERVAL, self._deliver_watchers)
        super().__init__(layer, session_group(session_id))

    async def _subscribed(self) -> None:
        try:  # after subscribing: anything later comes through the layer
            latest = await _latest_seq(self.session_id)
        except Exception:  # then every page's hello asks the database, as it may
            log.exception("could not read the last seq of session %s", self.session_id)
            return
        if latest is not None:
            self.latest = max(latest, self.latest or 0)

    @property
    def subscribed(self) -> bool:
        return self._started.done() and not self._started.cancelled()

    async def look(self, stored: int | None) -> None:
        """The session's last seq stored, read now (`Hub._verify`): has everything stored
        by the previous look come?"""
        expected, self._expected = self._expected, stored
        if expected is not None and (self.latest or 0) < expected:
            LAYER_DROPS.labels("lost").inc()
            log.warning(
                "feed of session %s: events up to %d never came; catching up",
                self.session_id,
                expected,
            )
            self.latest = expected
            await self._everyone_missed()

    async def _everyone_missed(self) -> None:
        """Messages were lost: events, and perhaps the state that came with them."""
        self._latest_state = None
        self._state_version += 1
        for viewer in list(self.viewers):
            await self._hand(viewer.missed)

    async def stop(self) -> None:
        if self._resuming is not None:
            self._resuming.cancel()
        await super().stop()

    async def _announce(self, watchers: dict[str, str]) -> None:
        await self.layer.group_send(self.group, {"type": "session.presence", **watchers})

    async def _read(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The layer failed (Redis went away): everyone may have missed something.
                log.exception("feed of session %s could not read; retrying", self.session_id)
                await asyncio.sleep(1)
                with contextlib.suppress(Exception):
                    await self.layer.group_add(self.group, self.channel)
                await self._everyone_missed()
                continue
            if self._resuming is not None:
                self._inbox.append(message)  # handed out, in order, when the pause ends
            else:
                await self._hand_out([message])

    async def _hand_out(self, messages: list[dict[str, Any]]) -> None:
        """Hands messages out at once, in the reader, as they come (a separate task would
        let the bridge's next recording start first and contend with the hand-out for the
        GIL: 100 viewers' p99 tripled). A hand-out that kept the worker busy (`_busy`) is
        followed by a pause as long (`_resume`), in which the worker does other work and
        messages gather for one frame: an overloaded feed then leaves its worker a third
        to half of its time, and the more viewers, the more events per frame. Fewer
        viewers, or messages far apart: no pause."""
        pause = await self._timed_dispatch(messages)
        if pause:
            self._resuming = asyncio.create_task(self._resume(pause))

    async def _resume(self, pause: float) -> None:
        """Pauses, hands out what came meanwhile, and goes on so while that keeps the
        worker busy (the first hand-out after a pause is judged against the pause too:
        in practice one round, unless hand-outs are long); then the reader hands out as
        messages come again. What came during the last hand-out (one that waited) goes
        out first, without a pause."""
        try:
            while True:
                if pause:
                    await _pause(pause)
                messages, self._inbox = self._inbox, []
                if not messages:
                    return
                pause = await self._timed_dispatch(messages)
        finally:
            self._resuming = None

    def _busy(self, spent: float, since: float) -> bool:
        """Whether a hand-out that took `spent` seconds, `since` seconds after the previous
        one began, calls for a pause: a long one (hundreds of viewers), or one that took
        most of the time since the previous one began."""
        return spent > PAUSE_AFTER or spent > since * BUSY_SHARE

    async def _timed_dispatch(self, messages: list[dict[str, Any]]) -> float:
        """Hands `messages` out; returns how long to pause after (0: none)."""
        began = _clock()
        since, self._last_hand_out = began - self._last_hand_out, began
        try:
            await self.dispatch(*messages)
        except Exception:  # a malformed message must not end the feed
            log.exception("feed of session %s could not hand out", self.session_id)
        spent = _clock() - began
        if not self._busy(spent, since):
            return 0.0
        self.pauses += 1
        return spent

    async def dispatch(self, *messages: dict[str, Any]) -> None:
        """Hands messages to the viewers in order, consecutive event batches as one frame."""
        pending: tuple[Batch, Batch] | None = None  # (for members, for link holders)
        for message in messages:
            if message.get("type") == "session.events" and message.get("items"):
                batch = Batch.of(message["items"])
                shared = _for_link_holders(batch, message.get("shared"))
                if pending is not None and _joinable(*pending, batch):
                    pending = _join(*pending, batch, shared)
                    continue
                if pending is not None:
                    await self._hand_events(*pending)
                pending = (batch, shared)
                continue
            if pending is not None:
                await self._hand_events(*pending)
                pending = None
            await self._dispatch_one(message)
        if pending is not None:
            await self._hand_events(*pending)

    async def _hand_events(self, batch: Batch, shared: Batch) -> None:
        self.batches += 1
        self.latest = max(batch.last, self.latest or 0)
        for viewer in list(self.viewers):
            await self._hand(viewer.live_events, batch if viewer.link_id is None else shared)

    async def _dispatch_one(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "session.state":
            frames = StateFrames(message)
            self._latest_state = frames
            self._state_version += 1
            for viewer in list(self.viewers):
                await self._hand(viewer.live_state, frames)
        elif kind == "session.presence":
            self._latest_watchers = {"html": message["html"], "shared": message["shared"]}
            self._deliveries.poke()

    async def state(self) -> StateFrames | None:
        """The session's header and controls as they are now, for a page that just caught
        up: the last state message this feed read or, before any, rendered once from the
        database (the feed was subscribed first, so a later change would have come in)."""
        if self._latest_state is not None:
            return self._latest_state
        async with self._rendering_state:  # a crowd catching up at once renders it once
            if self._latest_state is None:
                version = self._state_version
                message = await _current_state(self.session_id)
                if message is not None and version == self._state_version:
                    self._latest_state = StateFrames(message)
        return self._latest_state

    async def watchers(self) -> dict[str, str]:
        """The watcher list as last announced (the next announcement includes newcomers)."""
        async with self._rendering:  # a crowd arriving at once renders it once
            if self._latest_watchers is None:
                self._latest_watchers = await self.presence.current()
        return self._latest_watchers

    async def _deliver_watchers(self) -> None:
        watchers = self._latest_watchers
        if watchers is None:
            return
        for viewer in list(self.viewers):
            await self._hand(viewer.live_presence, watchers)

    async def _recount(self) -> None:
        """The watcher list as the database has it now, handed out if it changed. Nothing
        else would correct it: an announcement the live layer lost, or the viewers of a
        worker that died (their rows stop counting, and nobody announces that)."""
        try:
            current = await self.presence.current()
        except Exception:
            log.exception("could not count the watchers of session %s", self.session_id)
            return
        if current != self._latest_watchers:
            self._latest_watchers = current
            self._deliveries.poke()

    async def _hand(self, method: Any, *args: Any) -> None:
        try:
            await method(*args)
        except Exception:  # one broken socket must not cost the others their updates
            log.exception("a viewer of session %s failed to take a message", self.session_id)

    async def _keep(self) -> None:
        """Keep this worker's viewers counted as watching, their watcher list true, and its
        group membership alive."""
        since_join = 0.0
        while True:
            await asyncio.sleep(REFRESH)
            await self.presence.refresh(viewer.channel_name for viewer in self.viewers)
            await self._recount()
            since_join += REFRESH
            if since_join >= REJOIN_EVERY:
                since_join = 0.0
                await self.layer.group_add(self.group, self.channel)


class Relay(GroupMember):
    """This worker's member of one group addressed to people's sockets (a person's
    `user.<id>`, a link's `share.<id>`), shared by its local sockets in that group: each
    message is handed to each of them as Channels would dispatch it (`user.revoked` to
    `user_revoked`)."""

    def __init__(self, layer: Any, group: str) -> None:
        self.members: dict[Any, None] = {}  # an ordered set of consumers
        super().__init__(layer, group)

    async def _read(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
                name = get_handler_name(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay of %s could not read; retrying", self.group)
                await asyncio.sleep(1)
                with contextlib.suppress(Exception):
                    await self.layer.group_add(self.group, self.channel)
                continue
            for member in list(self.members):
                handler = getattr(member, name, None)
                if handler is None:
                    continue
                try:
                    await handler(message)
                except Exception:
                    log.exception("a socket of %s failed to take a message", self.group)

    async def _keep(self) -> None:
        while True:  # channels-redis forgets group members after a day
            await asyncio.sleep(REJOIN_EVERY)
            await self.layer.group_add(self.group, self.channel)


class Hub:
    """The feeds and relays of one worker process (one per pair of channel layers and event
    loop): relays on the default layer, feeds on the live streams' (`recording.live_layer`)."""

    def __init__(self, layer: Any, live: Any) -> None:
        self.layer = layer
        self.live = live
        self.feeds: dict[str, Feed] = {}
        self.relays: dict[str, Relay] = {}
        self._verifying: asyncio.Task[None] | None = None  # while there are feeds

    async def follow(self, group: str, member: Any) -> None:
        """Returns once messages sent to `group` reach `member` (through this worker's relay)."""
        relay = self.relays.get(group)
        if relay is None:
            relay = self.relays[group] = Relay(self.layer, group)
        relay.members[member] = None
        try:
            await relay.ready()
        except BaseException:
            await self.unfollow(group, member)
            raise

    async def unfollow(self, group: str, member: Any) -> None:
        relay = self.relays.get(group)
        if relay is None:
            return
        relay.members.pop(member, None)
        if not relay.members:
            del self.relays[group]
            await relay.stop()

    async def join(self, session_id: str, viewer: Viewer) -> Feed:
        feed = self.feeds.get(session_id)
        if feed is None:
            feed = self.feeds[session_id] = Feed(self.live, session_id)
            if self._verifying is None:
                self._verifying = asyncio.create_task(self._verify())
        if viewer not in feed.viewers:
            VIEWERS_HERE.inc()
        feed.viewers[viewer] = None
        try:
            await feed.ready()
        except BaseException:  # the layer refused (or the socket went): do not keep it
            await self.leave(session_id, viewer)
            raise
        return feed

    async def leave(self, session_id: str, viewer: Viewer) -> None:
        feed = self.feeds.get(session_id)
        if feed is None:
            return
        if viewer in feed.viewers:
            del feed.viewers[viewer]
            VIEWERS_HERE.dec()
        if not feed.viewers:
            del self.feeds[session_id]
            if not self.feeds and self._verifying is not None:
                self._verifying.cancel()
                self._verifying = None
            await feed.stop()
            try:  # the last socket went: write its departure now, not at the next tick
                await feed.presence.flush()
            except Exception:  # noted again for the next update; stale rows expire anyway
                log.exception("could not write the departures of session %s", session_id)

    async def _verify(self) -> None:
        """Every `VERIFY_EVERY` seconds, the last seq of every session this worker follows,
        in one query, for each of its feeds to compare with what came (`Feed.look`)."""
        while True:
            await _until_next_look(VERIFY_EVERY)
            feeds = [feed for feed in self.feeds.values() if feed.subscribed]
            if not feeds:
                continue
            try:
                stored = await _latest_seqs([feed.session_id for feed in feeds])
            except Exception:
                log.exception("could not read the last seqs of %d sessions", len(feeds))
                continue
            for feed in feeds:
                if self.feeds.get(feed.session_id) is not feed:
                    continue  # its last viewer left meanwhile
                try:
                    await feed.look(stored.get(feed.session_id))
                except Exception:
                    log.exception("could not catch up session %s", feed.session_id)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, int], Hub]] = (
    weakref.WeakKeyDictionary()
)


def hub_for(layer: Any, live: Any) -> Hub:
    """This process's hub for these layers, on the running event loop."""
    hubs = _hubs.setdefault(asyncio.get_running_loop(), {})
    key = (id(layer), id(live))
    hub = hubs.get(key)
    if hub is None or hub.layer is not layer or hub.live is not live:
        hub = hubs[key] = Hub(layer, live)
    return hub
