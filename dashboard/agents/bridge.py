"""The bridge: one per running session, holding its upstream socket.

Two tasks per connection keep the read loop prompt (DESIGN invariant 5): the reader only
moves frames from the socket into a queue; the recorder drains the queue in batches,
assembles lines, stores them (one transaction per batch), renders each fragment once and
publishes it. On upstream loss the bridge reconnects with capped exponential backoff and
full jitter, and lines the replayed scrollback up with what it stored.

The supervisor runs in every Porthole process and starts a bridge for each live session
whose lease it can claim, so recording continues with no viewer and after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections
from django.db.models import Q
from django.utils import timezone

from dashboard.agents import upstream
from dashboard.agents.alignment import align
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import (
    LeaseLost,
    Message,
    NewEvent,
    bridge_group,
    mask_secrets,
    publish,
    record,
)
from dashboard.agents.rendering import ToolIndex
from dashboard.opencomputer import (
    ExecStream,
    Exit,
    JSONLineAssembler,
    Line,
    NotFound,
    OpenComputerError,
    ScrollbackEnd,
    Stderr,
    Stdout,
)

log = logging.getLogger(__name__)

RING_BYTES = 1024 * 1024
LEASE_SECONDS = 30.0
BACKOFF_BASE = 0.25
BACKOFF_CAP = 15.0
# How long a session may stay unreachable before it is recorded as lost.
GIVE_UP_AFTER = 300.0
BATCH_MAX = 100  # frames taken off the queue at once (a frame may hold many lines)
RECORD_SLICE = 100  # events per transaction and per message to viewers

StreamOpener = Callable[[str, str], Awaitable[ExecStream]]


def backoff_delay(attempt: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full jitter: uniform over [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


def worker_id() -> str:
    configured = getattr(settings, "PORTHOLE_WORKER_ID", "")
    return configured or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# -- database helpers (small, each one thread hop) ---------------------------------------


@database_sync_to_async
def _load_session(session_id: object) -> AgentSession:
    return AgentSession.objects.select_related("sandbox").get(id=session_id)


@database_sync_to_async
def _stored_tail(session_id: object, source: str) -> list[str]:
    """The stored lines of one stream, oldest first, reaching back past the ring's size."""
    lines: list[str] = []
    size = 0
    rows = (
        Event.objects.filter(session_id=session_id, source=source)
        .order_by("-seq")
        .values_list("raw", flat=True)
        .iterator(chunk_size=500)
    )
    for raw in rows:
        lines.append(raw)
        size += len(raw.encode()) + 1
        if size > 2 * RING_BYTES:
            break
    lines.reverse()
    return lines


@database_sync_to_async
def _record(
    session_id: object, events: list[NewEvent], tools: ToolIndex, owner: str
) -> list[Message]:
    _, messages = record(
        session_id, events, tools=tools, lease_owner=owner, lease_seconds=LEASE_SECONDS
    )
    return messages


@database_sync_to_async
def _tool_index(session_id: object) -> ToolIndex:
    session = AgentSession.objects.get(id=session_id)
    return ToolIndex.for_session(session, [])


@database_sync_to_async
def _renew_lease(session_id: object, owner: str) -> bool:
    now = timezone.now()
    return bool(
        AgentSession.objects.filter(
            id=session_id, bridge_owner=owner, bridge_lease_until__gt=now
        ).update(bridge_lease_until=now + timedelta(seconds=LEASE_SECONDS))
    )


@database_sync_to_async
def _release_lease(session_id: object, owner: str) -> None:
    AgentSession.objects.filter(id=session_id, bridge_owner=owner).update(
        bridge_lease_until=None, bridge_owner=""
    )


@database_sync_to_async
def claim_sessions(owner: str, running: set[str], limit: int = 50) -> list[str]:
    """Take the lease of live sessions nobody holds (or whose holder stopped renewing)."""
    now = timezone.now()
    candidates = (
        AgentSession.objects.filter(status__in=AgentSession.LIVE_STATUSES)
        .filter(
            Q(bridge_lease_until__isnull=True)
            | Q(bridge_lease_until__lt=now)
            | Q(bridge_owner=owner)
        )
        .values_list("id", flat=True)[:limit]
    )
    claimed = []
    for session_id in candidates:
        if str(session_id) in running:
            continue
        won = (
            AgentSession.objects.filter(id=session_id, status__in=AgentSession.LIVE_STATUSES)
            .filter(
                Q(bridge_lease_until__isnull=True)
                | Q(bridge_lease_until__lt=now)
                | Q(bridge_owner=owner)
            )
            .update(bridge_owner=owner, bridge_lease_until=now + timedelta(seconds=LEASE_SECONDS))
        )
        if won:
            claimed.append(str(session_id))
    return claimed


# -- the bridge ----------------------------------------------------------------------------


@dataclass
class _Connection:
    """What one upstream connection has seen so far."""

    replay: list[tuple[str, bytes]] = field(default_factory=list)
    live: bool = False
    stdout: JSONLineAssembler = field(default_factory=JSONLineAssembler)
    stderr: JSONLineAssembler = field(default_factory=JSONLineAssembler)


class Bridge:
    def __init__(
        self,
        session_id: str,
        owner: str,
        *,
        open_stream: StreamOpener | None = None,
        give_up_after: float = GIVE_UP_AFTER,
    ) -> None:
        self.session_id = session_id
        self.owner = owner
        self._open_stream = open_stream
        self.give_up_after = give_up_after
        self.finished = asyncio.Event()
        self.connections = 0
        self._stream: ExecStream | None = None
        self._tools: ToolIndex | None = None

    async def run(self) -> None:
        """Record until the session exits, is lost, or another worker takes the lease.

        The bridge's database and rendering work runs on a thread of its own: on asgiref's
        one shared thread it would queue every consumer's database hop behind it, and
        viewers would wait on the bridge's next batch.
        """
        async with ThreadSensitiveContext():
            try:
                await self._run()
            finally:
                await database_sync_to_async(connections.close_all)()

    async def _run(self) -> None:
        session = await _load_session(self.session_id)
        sandbox_id, upstream_session = session.sandbox.upstream_id, session.upstream_id
        self._tools = await _tool_index(self.session_id)
        control = asyncio.create_task(
            self._control_loop(), name=f"bridge-control-{self.session_id}"
        )
        loop = asyncio.get_running_loop()
        attempt = 0
        unreachable_since = loop.time()
        try:
            while True:
                truncated = await self._check_upstream(sandbox_id, upstream_session)
                if truncated is None:
                    await self._note("lost", reason="the sandbox or session is gone upstream")
                    return
                stream = await self._connect(sandbox_id, upstream_session)
                if stream is not None:
                    self._stream = stream  # closed in `finally` even if the next write fails
                    self.connections += 1
                    if attempt:
                        await self._note("reconnected", attempts=attempt)
                    if await self._follow(stream, truncated=truncated):
                        return
                    attempt, unreachable_since = 0, loop.time()
                waited = loop.time() - unreachable_since
                if waited > self.give_up_after:
                    await self._note("lost", reason=f"upstream unreachable for {int(waited)} s")
                    return
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1
        except LeaseLost:
            log.info("bridge %s: lease taken over by another worker; stopping", self.session_id)
        finally:
            control.cancel()
            with contextlib.suppress(BaseException):
                await control
            if self._stream is not None:
                await self._stream.close()
            self.finished.set()

    async def _check_upstream(self, sandbox_id: str, session_id: str) -> bool | None:
        """None when the session is gone upstream; else whether its ring was truncated."""
        try:
            sessions = await upstream.client().list_exec(sandbox_id)
        except NotFound:
            return None
        except OpenComputerError:
            return False  # unreachable just now; the connect attempt and backoff handle it
        for info in sessions:
            if info.session_id == session_id:
                return bool(info.truncated)
        return None

    async def _connect(self, sandbox_id: str, session_id: str) -> ExecStream | None:
        try:
            if self._open_stream is not None:
                return await self._open_stream(sandbox_id, session_id)
            return await upstream.client().open_stream(sandbox_id, session_id)
        except OpenComputerError as exc:
            # NotFound too: the next upstream check decides whether it is gone for good.
            log.warning("bridge %s: cannot connect: %s", self.session_id, exc)
            return None

    async def _note(self, kind: str, **details: Any) -> None:
        await self._record([NewEvent.ours(Event.Source.BRIDGE, {"type": kind, **details})])

    async def _follow(self, stream: ExecStream, *, truncated: bool) -> bool:
        """Read one connection to its end. True when the process exited."""
        self._stream = stream
        queue: asyncio.Queue[object] = asyncio.Queue()
        closed = object()

        async def read() -> None:
            try:
                async for frame in stream:
                    queue.put_nowait(frame)
            except OpenComputerError as exc:
                log.info("bridge %s: upstream closed: %s", self.session_id, exc)
            finally:
                queue.put_nowait(closed)

        reader = asyncio.create_task(read(), name=f"bridge-read-{self.session_id}")
        state = _Connection()
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty() and len(batch) < BATCH_MAX:
                    batch.append(queue.get_nowait())
                exited = await self._handle(batch, state, closed, truncated=truncated)
                if exited is not None:
                    return exited
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await stream.close()
            self._stream = None

    async def _handle(
        self, batch: list[object], state: _Connection, closed: object, *, truncated: bool
    ) -> bool | None:
        events: list[NewEvent] = []
        outcome: bool | None = None
        for frame in batch:
            if frame is closed:
                outcome = False
                break
            if not state.live:
                if isinstance(frame, Stdout):
                    state.replay.append((Event.Source.AGENT, frame.data))
                elif isinstance(frame, Stderr):
                    state.replay.append((Event.Source.STDERR, frame.data))
                elif isinstance(frame, ScrollbackEnd):
                    events += await self._aligned_replay(state, truncated=truncated)
                    state.live = True
                elif isinstance(frame, Exit):
                    # An exit without end-of-scrollback: treat the replay as complete.
                    events += await self._aligned_replay(state, truncated=truncated)
                    state.live = True
                    events += self._finish(state, frame.code)
                    outcome = True
                    break
                continue
            if isinstance(frame, Stdout):
                events += _lines(Event.Source.AGENT, state.stdout.feed(frame.data))
            elif isinstance(frame, Stderr):
                events += _lines(Event.Source.STDERR, state.stderr.feed(frame.data))
            elif isinstance(frame, Exit):
                events += self._finish(state, frame.code)
                outcome = True
                break
        if events:
            await self._record(events)
        return outcome

    def _finish(self, state: _Connection, code: int) -> list[NewEvent]:
        tail = _lines(Event.Source.AGENT, state.stdout.flush())
        tail += _lines(Event.Source.STDERR, state.stderr.flush())
        return [*tail, NewEvent.ours(Event.Source.BRIDGE, {"type": "exit", "code": code})]

    async def _aligned_replay(self, state: _Connection, *, truncated: bool) -> list[NewEvent]:
        """The replayed lines we have not stored yet, in their original interleaving."""
        replayed: dict[str, list[str]] = {Event.Source.AGENT: [], Event.Source.STDERR: []}
        walk: list[tuple[str, Line]] = []
        assemblers = {Event.Source.AGENT: state.stdout, Event.Source.STDERR: state.stderr}
        for source, data in state.replay:
            for line in assemblers[source].feed(data):
                # Stored lines are masked (recording.py); compare like with like.
                replayed[source].append(mask_secrets(line.text))
                walk.append((source, line))
        state.replay.clear()
        skip: dict[str, int] = {}
        gap = False
        for source, lines in replayed.items():
            stored = await _stored_tail(self.session_id, source)
            result = align(stored, lines, truncated=truncated)
            skip[source] = len(lines) - len(result.new_lines)
            gap = gap or result.gap
        events: list[NewEvent] = []
        if gap:
            events.append(
                NewEvent.ours(
                    Event.Source.BRIDGE,
                    {
                        "type": "gap",
                        "message": "Output was evicted from the sandbox's scrollback before it was "
                        "recorded; some events are missing here.",
                    },
                )
            )
        for source, line in walk:
            if skip[source]:
                skip[source] -= 1
                continue
            events += _lines(source, [line])
        return events

    async def _record(self, events: list[NewEvent]) -> None:
        """Store, render and publish in slices, so the first event of a flood is not held
        back until the last one is rendered."""
        assert self._tools is not None
        for start in range(0, len(events), RECORD_SLICE):
            messages = await _record(
                self.session_id, events[start : start + RECORD_SLICE], self._tools, self.owner
            )
            await publish(messages)

    async def _control_loop(self) -> None:
        """Keep the lease alive and carry stdin lines (configure) from any worker upstream."""
        layer = get_channel_layer()
        channel = await layer.new_channel() if layer is not None else None
        if layer is not None and channel is not None:
            await layer.group_add(bridge_group(self.session_id), channel)
        try:
            while True:
                if layer is None or channel is None:
                    await asyncio.sleep(LEASE_SECONDS / 3)
                else:
                    try:
                        message = await asyncio.wait_for(layer.receive(channel), LEASE_SECONDS / 3)
                    except TimeoutError:
                        message = None
                    if message and message.get("type") == "bridge.stdin":
                        await self._send_stdin(message)
                if not await _renew_lease(self.session_id, self.owner):
                    log.info("bridge %s: lease lost", self.session_id)
                    if self._stream is not None:
                        await self._stream.close()
                    return
        finally:
            if layer is not None and channel is not None:
                await layer.group_discard(bridge_group(self.session_id), channel)

    async def _send_stdin(self, message: dict[str, Any]) -> None:
        line = message.get("line")
        if not isinstance(line, dict):
            return
        if self._stream is None:
            await self._undelivered(line, "the bridge is reconnecting to the sandbox")
            return
        try:
            await self._stream.send_line(line)
        except OpenComputerError as exc:
            log.warning("bridge %s: stdin not delivered: %s", self.session_id, exc)
            await self._undelivered(line, "the connection to the sandbox broke")

    async def _undelivered(self, line: dict[str, Any], why: str) -> None:
        await self._note(
            "action_failed", action=str(line.get("type", "stdin")), message=f"Not sent: {why}."
        )


def _lines(source: str, lines: list[Line]) -> list[NewEvent]:
    return [NewEvent.from_line(source, line.text, line.data) for line in lines]


# -- the supervisor --------------------------------------------------------------------------


class BridgeSupervisor:
    """Starts and tracks this process's bridges."""

    POLL_SECONDS = 2.0
    WAKE_GROUP = "bridges"

    def __init__(self, owner: str | None = None) -> None:
        self.owner = owner or worker_id()
        self.bridges: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen_for_wakeups())
        try:
            while True:
                await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.POLL_SECONDS)
                self._wake.clear()
        finally:
            listener.cancel()
            await self.stop()

    async def tick(self) -> list[str]:
        running = {sid for sid, task in self.bridges.items() if not task.done()}
        try:
            claimed = await claim_sessions(self.owner, running)
        except Exception:
            log.exception("bridge supervisor: cannot claim sessions")
            return []
        for session_id in claimed:
            bridge = Bridge(session_id, self.owner)
            self.bridges[session_id] = asyncio.create_task(
                self._run_bridge(bridge), name=f"bridge-{session_id}"
            )
        return claimed

    async def _run_bridge(self, bridge: Bridge) -> None:
        try:
            await bridge.run()
        except Exception:
            log.exception("bridge %s crashed; its lease will be retaken", bridge.session_id)
            await asyncio.sleep(backoff_delay(3))
        finally:
            await _release_lease(bridge.session_id, self.owner)

    async def _listen_for_wakeups(self) -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        channel = await layer.new_channel()
        await layer.group_add(self.WAKE_GROUP, channel)
        try:
            while True:
                await layer.receive(channel)
                self._wake.set()
        finally:
            await layer.group_discard(self.WAKE_GROUP, channel)

    async def stop(self) -> None:
        tasks = list(self.bridges.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def wake_supervisors() -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(BridgeSupervisor.WAKE_GROUP, {"type": "bridges.wake"})
