"""The bridge: one per running session, holding its upstream socket.

Three tasks per bridge keep reading independent of recording (DESIGN invariant 5):
- the reader moves frames from the socket, and a parser task of its connection turns them
  into lines, keeps a `ReadLog` of what it read, and hands batches of events to the
  recorder (waiting while the recorder is far behind; see `UNPARSED_BYTES`); when the
  socket goes, it reconnects at once (then capped exponential backoff with full jitter),
  whatever the recorder's backlog, and lines the replay up with what it *read*
  (alignment.py, in a thread);
- the recorder stores, renders and publishes in slices (recording.py), each write fenced
  by the lease epoch; while events wait for it, it stores first and draws after
  (`Undrawn`, `DRAW_SHARE`), so that the record keeps up with the sandbox;
- the control task renews the lease and writes stdin lines (configure) from any worker,
  acknowledging each to the person who asked, after checking the fence.

A session is marked lost only when the upstream says it is gone (the sandbox, or the
session in a sandbox that still exists); while it may be alive the reader keeps trying.

Leases are in leases.py, supervision in supervisor.py, alignment in alignment.py, stdin
requests in stdin.py. What stays here (under 500 lines) is the three tasks of one bridge,
which share one upstream connection's state and one database connection, and belong
together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from dashboard import metrics
from dashboard.agents import leases, upstream
from dashboard.agents.alignment import HISTORY_BYTES, Aligned, ReadLog, align
from dashboard.agents.leases import Lease, LeaseLost
from dashboard.agents.models import AgentSession, Event, SessionId
from dashboard.agents.recording import (
    DrawnStored,
    Message,
    NewEvent,
    bridge_group,
    changes_state,
    current_state_messages,
    draw_stored,
    publish,
    record,
    state_messages,
    store,
)
from dashboard.agents.rendering import ToolIndex
from dashboard.agents.stdin import acknowledge
from dashboard.awareness import attention
from dashboard.logs import bind_session
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
from dashboard.search.index import index_events, index_tail

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.25
BACKOFF_CAP = 15.0
RECORD_SLICE = 100  # events per transaction and per message to viewers
# A recorder that falls behind (events wait to be stored) stores first and draws after:
# drawing an event (rendering it, writing its element, announcing it) costs about four
# times what storing it does, and the record must keep up with the sandbox, where the
# viewers can wait. While events wait, drawing takes at most DRAW_SHARE of the recorder's
# time; once none do, it catches up. Rows stored and not yet drawn are kept for the drawer
# up to DRAW_AHEAD (and DRAW_AHEAD_CHARS of lines); past that, it reads them back.
DRAW_SHARE = 0.1
DRAW_AHEAD = 5_000
DRAW_AHEAD_CHARS = 8 * 2**20  # and no more than this of their raw lines
STORE_SLICE = 500  # events per transaction while storing first
# While a backlog is drawn, its viewers are told how far behind the page is (the state's
# "N more recorded" note) at most this often (seconds), and once more when it is drawn.
TELL_BEHIND_EVERY = 2.0
# The search index gets a bridge's events on a thread of its own, at most this many
# seconds after they were recorded, or as soon as this many events (or raw characters) are
# held back: a paced session is indexed a few batches at a time, a flood in large ones, and
# the recorder never waits for it (`IndexFeed`). Twice as many held back, and the
# recorder does wait: the index falling behind must not grow memory without bound.
INDEX_AFTER = 0.5
INDEX_HELD_EVENTS = 1000
INDEX_HELD_CHARS = 8 * 2**20
# The most a bridge can leave unindexed if it stops abruptly (being written, and held back
# up to twice the bound, each with a slice more): what the next one looks back over.
INDEX_TAIL = 4 * INDEX_HELD_EVENTS + 2 * RECORD_SLICE
# Seconds past the idle threshold before a bridge looks whether its session now needs
# attention for sitting idle: the rule reads the database's clock, not this process's.
IDLE_LOOK_MARGIN = 0.5
FRUITLESS_AT_ONCE = 5  # connections cut inside a replay of old output, retried at once
# After more of those, waits stay short: the upstream is there and talking, and every
# second away lets its ring move on (a chaos-proxy run lost 274 texts to 2-4 s waits).
DELIVERING_BACKOFF_CAP = 0.5
# How far the reader may fall behind (bytes the server sent that wait unread in the socket)
# before it drops the connection and reconnects: the server drops live output, silently, for
# a client whose socket is full and whose 256 chunks of its own buffer are too; a reconnect
# replays the ring instead, which the alignment lines up (or records a gap). Half of the
# receive buffer comes before a full socket whatever the kernel's overhead per byte; the cap
# keeps what a reconnect discards well inside the 1 MiB ring.
# (`settings.BRIDGE_LAG_RECONNECT_BYTES`, off by default: see `_behind`.)
LAG_LIMIT_SHARE = 2  # of the socket's receive buffer
LAG_CHECK_FROM = 4 * 1024  # below this, no need to ask the buffer size
# The reader only moves frames; a parser task on the same loop turns them into events, a
# few lines at a time, so that a flood waits in this process (where nothing is dropped)
# rather than in the socket and the server's buffer (where it is, silently). Bounded: past
# UNPARSED_BYTES read and not yet parsed the connection is dropped like a lagging one (the
# replay is lined up, or a gap recorded), and parsing waits while EVENTS_AHEAD parsed
# events wait for the recorder, so what is kept stays raw and small. When a connection is
# cut (not at the exit), what is left is parsed at once, without waiting for the recorder
# (the reconnect waits for it: the next replay is lined up with it), so a cut in the
# middle of a large backlog briefly holds it as events.
UNPARSED_BYTES = 32 * 1024 * 1024
EVENTS_AHEAD = 2_000
PARSE_SLICE = 50  # lines turned into events between two looks at the socket

StreamOpener = Callable[[str, str], Awaitable[ExecStream]]
# Read output (source, bytes, when it was read: the loop's clock), an exit code, the end.
Chunk = tuple[str, bytes, float] | int | None
# Events for the recorder and when what they came from was read (`metrics.RECORDING_LAG`).
Batch = tuple[list[NewEvent], float]


def backoff_delay(attempt: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full jitter: uniform over [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


def retry_wait(attempt: int, *, delivered: bool) -> float:
    """How long to wait before connection attempt `attempt` (0: at once). Backing off is for
    an upstream that cannot be reached or says nothing; one whose connections deliver frames
    (replays cut short) is retried within `DELIVERING_BACKOFF_CAP`."""
    if not attempt:
        return 0.0
    return backoff_delay(attempt - 1, cap=DELIVERING_BACKOFF_CAP if delivered else BACKOFF_CAP)


def stored_form(source: str, line: Line) -> str:
    """A line as the store keeps it (masked, storable): what the read log compares."""
    return NewEvent.from_line(source, line.text, line.data).raw


# -- the bridge's database connection ------------------------------------------------------

# A connection idle this long is checked before it is used again (the server, a proxy or a
# restart may have dropped it meanwhile); one in use back to back is trusted.
IDLE_CHECK_SECONDS = 10.0
_last_used: weakref.WeakKeyDictionary[BaseDatabaseWrapper, float] = weakref.WeakKeyDictionary()


def _usable_connections() -> None:
    """Close only the connections that cannot be used any more.

    Channels' `database_sync_to_async` closes every connection before and after each call
    unless CONN_MAX_AGE says otherwise: a bridge then opened a connection per batch (about
    300 for a flood of 20,000 events on PostgreSQL, each with its own setup). A bridge's
    calls all run on its own thread, so it keeps one connection for its whole life and
    closes it when it stops (`Bridge.run`); a connection left broken by an error, or found
    dead after sitting idle, is dropped here and the next query opens a new one.
    """
    now = time.monotonic()
    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        idle = now - _last_used.get(connection, now)
        suspect = connection.errors_occurred or idle > IDLE_CHECK_SECONDS
        autocommit = connection.settings_dict["AUTOCOMMIT"]
        if connection.get_autocommit() != autocommit or (suspect and not connection.is_usable()):
            connection.close()
        else:
            connection.errors_occurred = False
        _last_used[connection] = now


def _return_pooled() -> None:
    """Hand pooled connections back (a bridge holding one for its life would drain a pool
    of 20 with 20 live sessions); cheap, unlike opening one."""
    for connection in connections.all(initialized_only=True):
        pooled = connection.settings_dict.get("OPTIONS", {}).get("pool")
        if pooled and connection.connection is not None and not connection.in_atomic_block:
            connection.close()


def _keeping_connection[**P, T](fn: Callable[P, T]) -> Callable[P, T]:
    """`fn` on a kept connection (or, with PostgreSQL's pool, one borrowed for the call)."""

    @functools.wraps(fn)
    def keeping_connection(*args: P.args, **kwargs: P.kwargs) -> T:
        _usable_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            _return_pooled()

    return keeping_connection


# The raw SQLite connection each bridge connection was last told not to checkpoint.
_not_checkpointing: weakref.WeakKeyDictionary[BaseDatabaseWrapper, object] = (
    weakref.WeakKeyDictionary()
)


def _leaving_checkpoints_to_others() -> None:
    """A SQLite commit that finds the write-ahead log past its bound (1,000 pages) copies it
    into the database file and syncs that, there and then: once every few hundred paced
    events a bridge's commit took 5–20 ms more (a one-event record's p99 5.8 ms, 1.35
    without). A bridge's connection leaves it to the other connections of its process,
    whose commits checkpoint beside the bridge's writes (a passive checkpoint waits for no
    writer): the search index's thread, the supervisor's heartbeats, requests that write."""
    connection = connections["default"]
    if connection.vendor != "sqlite":
        return
    connection.ensure_connection()
    if _not_checkpointing.get(connection) is connection.connection:
        return
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    _not_checkpointing[connection] = connection.connection


def _recording[**P, T](fn: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(fn)
    def recording(*args: P.args, **kwargs: P.kwargs) -> T:
        _leaving_checkpoints_to_others()
        return fn(*args, **kwargs)

    return recording


def on_bridge_thread[**P, T](fn: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    """`fn` on the calling bridge's own thread (see `Bridge.run`), on a kept connection
    (or, with PostgreSQL's pool, one borrowed for the call) that does not checkpoint."""
    return sync_to_async(_keeping_connection(_recording(fn)), thread_sensitive=True)


# One thread (and connection) per process writes the search index for all of its bridges:
# the index's work overlaps their recording instead of coming between two records.
_INDEX_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="porthole-index")


def on_index_thread[**P, T](fn: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    return sync_to_async(_keeping_connection(fn), thread_sensitive=False, executor=_INDEX_THREAD)


def _nothing() -> None:
    pass


# Returns once the index thread has done what it was given before: a stopped bridge's
# write in flight runs to its end even when the task awaiting it was cancelled.
_index_thread_done = sync_to_async(_nothing, thread_sensitive=False, executor=_INDEX_THREAD)


# -- database helpers (small, each one thread hop) ---------------------------------------


@on_bridge_thread
def _load_session(session_id: SessionId) -> AgentSession:
    return AgentSession.objects.select_related("sandbox").get(id=session_id)


@on_bridge_thread
def _stored_log(session_id: SessionId) -> ReadLog:
    """What earlier bridges stored, as a read log: the last lines, reaching past the ring."""
    items: list[tuple[str, str]] = []
    size = 0
    rows = (
        Event.objects.filter(session__pk=session_id)
        .exclude(source=Event.Source.DASHBOARD)
        .order_by("-seq")
        .values_list("source", "type", "raw")
        .iterator(chunk_size=500)
    )
    for source, kind, raw in rows:
        if source == Event.Source.BRIDGE:
            if kind != "quarantined":
                continue
            kept = json.loads(raw)  # the line that could not be stored as itself
            source, raw = kept.get("source", ""), kept.get("raw", "")
        items.append((source, raw))
        size += len(raw) + 1
        if size > HISTORY_BYTES:
            break
    items.reverse()
    return ReadLog.of(items)


@on_bridge_thread
def _record(
    events: list[NewEvent], tools: ToolIndex, lease: Lease
) -> tuple[list[Event], list[Message], bool]:
    appended, messages = record(lease.session_id, events, tools=tools, lease=lease, index=False)
    return appended.events, messages, appended.held


@on_bridge_thread
def _store(events: list[NewEvent], lease: Lease) -> tuple[list[Event], bool]:
    appended = store(lease.session_id, events, lease=lease)
    return appended.events, changes_state(appended)


_state_now = on_bridge_thread(current_state_messages)


@on_bridge_thread
def _draw_stored(
    first: int, last: int, kept: dict[int, Event], tools: ToolIndex, lease: Lease
) -> DrawnStored:
    return draw_stored(lease.session_id, first, last, kept, tools, lease=lease)


@on_bridge_thread
def _idle_look(session_id: SessionId) -> tuple[list[Message], float | None]:
    """The session's state to announce, if it has just come to need attention for sitting idle
    (time passing is no event: nothing else would redraw its pages and list rows); otherwise
    how many seconds until it would, if nothing happens meanwhile."""
    sessions = AgentSession.objects.select_related("sandbox", "started_by").filter(pk=session_id)
    session = attention.with_attention(sessions).first()
    if session is None:
        return [], None
    if "idle" in attention.of(session).reasons:
        return state_messages(session), None
    due = attention.idle_in(session, timezone.now())
    return [], None if due is None else due.total_seconds()


_index_events = on_index_thread(index_events)
_index_tail = on_index_thread(index_tail)


@on_bridge_thread
def _tool_index(session_id: SessionId) -> ToolIndex:
    session = AgentSession.objects.get(id=session_id)
    return ToolIndex.for_session(session, [])


class Undrawn:
    """What a bridge has stored and not yet drawn: seqs `drawn_through`+1 to
    `stored_through`, the rows of some of them (up to `keep` rows and `keep_chars` of raw
    lines; the rest are read back), and whether the session's state changed meanwhile: it
    is announced (as the database has it then) once the events stored before the change
    are. The drawer takes them in order, a slice at a time, whoever stored them (a person's
    action stored meanwhile lies among them)."""

    def __init__(self, drawn_through: int, stored_through: int, keep: int, keep_chars: int) -> None:
        self.drawn_through = drawn_through
        self.stored_through = max(stored_through, drawn_through)
        self.keep, self.keep_chars = keep, keep_chars
        self.rows: dict[int, Event] = {}
        self.kept_chars = 0
        self.state_after: int | None = None  # announce the state once drawn through this

    @classmethod
    def of(cls, session: AgentSession) -> Undrawn:
        """What the session's bridges have stored and not drawn, as the database says; its
        state is announced once that is drawn (whatever changed it went unannounced)."""
        undrawn_from = session.undrawn_from or session.next_seq
        undrawn = cls(undrawn_from - 1, session.next_seq - 1, DRAW_AHEAD, DRAW_AHEAD_CHARS)
        if undrawn.pending:
            undrawn.state_after = undrawn.stored_through
        return undrawn

    @property
    def pending(self) -> bool:
        return self.stored_through > self.drawn_through

    def stored(self, rows: list[Event], state_changed: bool) -> None:
        if rows and not self.pending:
            # A backlog begins: what was stored before it was announced, by this bridge or
            # by whoever stored it (a person's action, with nothing undrawn before it).
            self.drawn_through = self.stored_through = rows[0].seq - 1
        for row in rows:
            if len(self.rows) < self.keep and self.kept_chars + len(row.raw) <= self.keep_chars:
                self.rows[row.seq] = row
                self.kept_chars += len(row.raw)
        if rows:
            self.stored_through = max(self.stored_through, rows[-1].seq)
        if state_changed:
            self.state_after = self.stored_through

    def announced(self, rows: list[Event]) -> None:
        """Rows stored and drawn at once, nothing undrawn before them."""
        if rows:
            self.drawn_through = self.stored_through = rows[-1].seq

    def next_slice(self, size: int) -> tuple[int, int, dict[int, Event]]:
        """The next seqs to draw (first, last) and the rows kept of them."""
        first = self.drawn_through + 1
        last = min(self.stored_through, first + size - 1)
        return (
            first,
            last,
            {seq: self.rows[seq] for seq in range(first, last + 1) if seq in self.rows},
        )

    def drawn(self, last: int, stored_through: int) -> bool:
        """Drawn through `last`, the database having `stored_through`: whether the
        session's state is to be announced now."""
        for seq in range(self.drawn_through + 1, last + 1):
            row = self.rows.pop(seq, None)
            if row is not None:
                self.kept_chars -= len(row.raw)
        self.drawn_through = last
        self.stored_through = max(self.stored_through, stored_through)
        if self.state_after is not None and self.state_after <= last:
            self.state_after = None
            return True
        return False


class IndexFeed:
    """What one bridge recorded, on its way to the search index: held back for at most
    `INDEX_AFTER` seconds (or until the bound), then written on the index thread
    (`on_index_thread`) while the bridge records on. One write in flight at a time, taking
    whatever was held meanwhile. After a crash, the next bridge's feed indexes again what
    this one may have held (`start`)."""

    def __init__(self, session_id: SessionId) -> None:
        self.session_id = session_id
        self.held: list[Event] = []
        self.held_chars = 0
        self.full = asyncio.Event()  # as many held back as `held_back` allows
        self.writing: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Index what a bridge before this one recorded and may not have indexed, beside
        the recording."""
        self.writing = asyncio.create_task(self._tail())

    def held_back(self, times: int = 1) -> bool:
        return len(self.held) >= times * INDEX_HELD_EVENTS or self.held_chars >= (
            times * INDEX_HELD_CHARS
        )

    async def hold(self, rows: list[Event]) -> None:
        """Rows just recorded. Returns at once, unless twice the bound is held back while a
        write is in flight: the index falling behind must not grow memory without bound."""
        self.held += rows
        self.held_chars += sum(len(row.raw) for row in rows)
        if self.held_back():
            self.full.set()
        if self.writing is None or self.writing.done():
            self.writing = asyncio.create_task(self._write())
        elif self.held_back(2):
            await asyncio.shield(self.writing)

    async def finish(self) -> None:
        """Write everything held now, and wait until it is written (a writer runs whenever
        rows are held: `hold` starts one, and it ends only when none are left)."""
        self.full.set()
        if self.writing is not None:
            await self.writing

    def tasks(self) -> list[asyncio.Task[None]]:
        return [self.writing] if self.writing is not None else []

    async def _write(self) -> None:
        while self.held:
            if not self.full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.full.wait(), INDEX_AFTER)
            self.full.clear()
            rows, self.held, self.held_chars = self.held, [], 0
            try:
                await _index_events(rows)
            except Exception:  # the connection's upkeep, not the index (which never raises)
                log.exception("bridge %s: %d events not indexed", self.session_id, len(rows))

    async def _tail(self) -> None:
        try:
            await _index_tail(self.session_id, INDEX_TAIL)
        except Exception:  # as in `_write`
            log.exception("bridge %s: the tail was not indexed", self.session_id)
        await self._write()


# -- the bridge ----------------------------------------------------------------------------


class Bridge:
    def __init__(
        self,
        session_id: str,
        owner: str,
        *,
        lease: Lease | None = None,
        open_stream: StreamOpener | None = None,
    ) -> None:
        self.session_id = session_id
        self.owner = owner
        self.lease = lease
        self._open_stream = open_stream
        self.finished = asyncio.Event()
        self.connections = 0
        self.ended = False  # the session exited or was lost: nothing more to record
        self.complete = False  # recorded to the end, and that indexed
        self._stream: ExecStream | None = None
        self._queue: asyncio.Queue[Batch | None] = asyncio.Queue()  # None: done
        self._queued = 0  # events in `_queue`
        self._recorded = asyncio.Event()  # the recorder took events from `_queue`
        self._unparsed = 0  # bytes read from the socket, not yet parsed
        self._connection_ended = False  # parse what is left without waiting for the recorder
        self._log = ReadLog()
        self._assemblers: dict[str, JSONLineAssembler] = {}
        self._sent: dict[str, str | None] = {}  # stdin requests answered, by id
        self._frames = 0  # frames the current connection delivered
        # Read once: asked after every live frame and parsed slice (`_behind`); 0: off.
        self._lag_cap = int(settings.BRIDGE_LAG_RECONNECT_BYTES)
        self._lagged = False  # the current connection was dropped because reading fell behind
        self.lag_reconnects = 0
        self._index = IndexFeed(session_id)
        self._undrawn = Undrawn(0, 0, DRAW_AHEAD, DRAW_AHEAD_CHARS)
        # While events wait to be stored: the recorder's time storing and drawing (seconds).
        self._storing = self._drawing = 0.0
        self._told_behind: float | None = None  # when viewers were last told (loop time)
        self._idle_look_at: asyncio.TimerHandle | None = None
        self._idle_looking: asyncio.Task[None] | None = None
        self._look_again = False

    async def run(self) -> None:
        """Record until the session exits, is lost, or another worker takes the lease.

        The bridge's database and rendering work runs on a thread of its own: on asgiref's
        one shared thread it would queue every consumer's database hop behind it.
        """
        bind_session(self.session_id)  # every line this bridge logs names its session
        async with ThreadSensitiveContext():
            try:
                await self._run()
            finally:
                self.finished.set()
                # On its thread, but not through `on_bridge_thread`, which would open a
                # connection (to tell it not to checkpoint) only for this to close it.
                await sync_to_async(connections.close_all, thread_sensitive=True)()

    async def _run(self) -> None:
        if self.lease is None:
            self.lease = await on_bridge_thread(leases.current)(self.session_id, self.owner)
            if self.lease is None:
                log.info("bridge %s: no lease held by %s", self.session_id, self.owner)
                return
        session = await _load_session(self.session_id)
        self._tools = await _tool_index(self.session_id)
        self._undrawn = Undrawn.of(session)  # what an earlier bridge did not draw, first
        self._log = await _stored_log(self.session_id)
        reader = asyncio.create_task(
            self._read(session.sandbox.upstream_id, session.upstream_id),
            name=f"bridge-read-{self.session_id}",
        )
        recorder = asyncio.create_task(self._record_loop(), name=f"bridge-rec-{self.session_id}")
        self._look_for_idleness()  # it may have ended a turn while no bridge held it
        control = asyncio.create_task(self._control(), name=f"bridge-ctl-{self.session_id}")
        tasks = {reader, recorder, control}
        try:
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if recorder in done or control in done:
                    break
                if reader in done and reader.exception() is not None:
                    break
                tasks.discard(reader)
            for task in (recorder, control, reader):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        except LeaseLost:
            metrics.LEASES_LOST.inc()
            log.info("bridge %s: lease taken over by another worker; stopping", self.session_id)
        finally:
            if self._idle_look_at is not None:
                self._idle_look_at.cancel()
            tasks = {reader, recorder, control, *self._index.tasks()}
            if self._idle_looking is not None:
                tasks.add(self._idle_looking)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            # Nothing of this bridge's is still writing once it has stopped (a takeover, a
            # test's teardown flushing the tables, the process exiting).
            await _index_thread_done()
            if self._stream is not None:
                await self._stream.close()

    # -- reading ---------------------------------------------------------------------------

    def _hand_over(self, events: list[NewEvent], read_at: float | None = None) -> None:
        if events:
            self._queued += len(events)
            loop = asyncio.get_running_loop()
            self._queue.put_nowait((events, loop.time() if read_at is None else read_at))

    async def _read(self, sandbox_id: str, session_id: str) -> None:
        attempt = fruitless = 0
        delivered = False
        while True:
            if attempt:
                await asyncio.sleep(retry_wait(attempt, delivered=delivered))
            stream = await self._connect(sandbox_id, session_id)
            if stream is None:
                gone = await self._gone(sandbox_id, session_id)
                if gone is not None:
                    self._hand_over([_note("lost", **gone)])
                    break
                attempt += 1
                delivered = False
                continue
            self.connections += 1
            if self.connections > 1:
                metrics.UPSTREAM_RECONNECTS.inc()
                reason = "lagging" if self._lagged else "lost"
                self._hand_over([_note("reconnected", attempts=attempt + 1, reason=reason)])
            self._lagged = False
            progress, exited = await self._follow(stream)
            if exited:
                break
            # Reconnect at once after a connection that brought something (the upstream is
            # there: waiting only lets the ring evict more), and after a few that were cut
            # inside a replay of what was read already; back off after the rest (briefly
            # while connections still deliver: `retry_wait`).
            fruitless = 0 if progress else fruitless + 1
            delivered = self._frames > 0
            attempt = (
                0 if progress or (delivered and fruitless <= FRUITLESS_AT_ONCE) else attempt + 1
            )
            if not self._lagged:
                log.info("bridge %s: upstream closed; reconnecting", self.session_id)
        self.ended = True
        self._queue.put_nowait(None)

    async def _connect(self, sandbox_id: str, session_id: str) -> ExecStream | None:
        try:
            if self._open_stream is not None:
                return await self._open_stream(sandbox_id, session_id)
            return await upstream.client().open_stream(sandbox_id, session_id)
        except OpenComputerError as exc:
            log.warning("bridge %s: cannot connect: %s", self.session_id, exc)
            return None

    async def _gone(self, sandbox_id: str, session_id: str) -> dict[str, str] | None:
        """What the upstream says is gone (the sandbox, or the session), or None while the
        session may still be alive (including when the upstream cannot be reached)."""
        try:
            sessions = await upstream.client().list_exec(sandbox_id)
        except NotFound:
            return {"gone": "sandbox", "reason": "the sandbox no longer exists upstream"}
        except OpenComputerError:
            return None
        if any(info.session_id == session_id for info in sessions):
            return None
        return {"gone": "session", "reason": "the sandbox no longer has this session"}

    async def _follow(self, stream: ExecStream) -> tuple[bool, bool]:
        """Read one connection to its end: (whether it made progress: went live or brought
        new lines; whether the process exited)."""
        self._stream = stream
        self._frames = 0
        replay: list[tuple[str, bytes]] = []
        live = False
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        parser = asyncio.create_task(self._parse(chunks), name=f"bridge-parse-{self.session_id}")
        cancelled = exited = False
        try:
            while True:
                try:
                    frame = await stream.recv()
                except OpenComputerError as exc:
                    log.info("bridge %s: upstream error: %s", self.session_id, exc)
                    frame = None
                if frame is not None:
                    self._frames += 1
                if frame is None:
                    if not live and replay:
                        # Cut short: what did arrive is a contiguous piece of output.
                        live = await self._align(replay, complete=False)
                    return live, False
                if not live:
                    if isinstance(frame, Stdout):
                        replay.append((Event.Source.AGENT, frame.data))
                        continue
                    if isinstance(frame, Stderr):
                        replay.append((Event.Source.STDERR, frame.data))
                        continue
                    if isinstance(frame, ScrollbackEnd | Exit):
                        await self._align(replay, complete=True)
                        live = True
                if isinstance(frame, Stdout | Stderr):
                    source = (
                        Event.Source.AGENT if isinstance(frame, Stdout) else Event.Source.STDERR
                    )
                    self._unparsed += len(frame.data)
                    chunks.put_nowait((source, frame.data, asyncio.get_running_loop().time()))
                elif isinstance(frame, Exit):
                    chunks.put_nowait(frame.code)
                    exited = True
                    return True, True
                if self._behind(stream):
                    stream.abort()  # a close handshake would wait behind the whole backlog
                    return True, False
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # The connection is over for everyone: the parser asks it nothing more (no lag
            # counted twice), stdin is told the bridge is reconnecting.
            self._stream = None
            if cancelled:
                parser.cancel()
            else:
                # Everything read is parsed before the next replay is lined up with it, and
                # at once: waiting for the recorder here would hold the reconnect back while
                # the sandbox's ring moves on (issue 7). After the exit nothing follows, and
                # the parse-ahead stays bounded.
                self._connection_ended = not exited
                self._recorded.set()
                chunks.put_nowait(None)
                await parser
                self._connection_ended = False
            self._log.pending = {s: a.peek() for s, a in self._assemblers.items()}
            await stream.close()

    async def _parse(self, chunks: asyncio.Queue[Chunk]) -> None:
        """Turn what the reader read into events, in order, a slice at a time (the reader
        takes the next frame in between), waiting while the recorder is far behind, unless
        the connection was cut."""
        while (chunk := await chunks.get()) is not None:
            if isinstance(chunk, int):
                self._exit(chunk)
                continue
            source, data, read_at = chunk
            self._unparsed -= len(data)
            lines = self._assemblers.setdefault(source, JSONLineAssembler()).feed(data)
            for start in range(0, len(lines), PARSE_SLICE):
                while self._queued > EVENTS_AHEAD and not self._connection_ended:
                    self._recorded.clear()
                    await self._recorded.wait()
                self._hand_over(self._events(source, lines[start : start + PARSE_SLICE]), read_at)
                stream = self._stream
                if stream is not None and self._lag_cap > 0 and self._behind(stream):
                    stream.abort()  # the reader sees the end and reconnects (for lag)
                await asyncio.sleep(0)

    def _behind(self, stream: ExecStream) -> bool:
        """Whether live reading has fallen so far behind that the server may soon drop output
        for this connection (nothing on the wire would say so): then the caller drops the
        connection instead, and the next one's replay is lined up with what was read.

        Always: past `UNPARSED_BYTES` read and not yet parsed. The socket's backlog is asked
        after every live frame, before the next is taken, and (the reader drains the socket
        in bursts while the loop parses) by the parser between its slices: output the server
        dropped lies behind a full socket, so the backlog shows before a hole is read past.

        Once per connection: the reader and the parser both ask, and whichever asks second,
        before the reader has left the connection being dropped, must not count it again.
        """
        if self._lagged:
            return False  # being dropped already
        if self._unparsed > UNPARSED_BYTES:
            return self._lag("read and not yet parsed", self._unparsed, UNPARSED_BYTES)
        # The socket's backlog is off unless configured: a burst (one large tool result)
        # fills the socket as much as a flood does, and a reconnect then can only report a
        # possible gap where nothing was lost (the server's 256 large chunks carried it).
        cap = self._lag_cap
        if cap <= 0:
            return False
        unread = stream.unread_bytes()
        if unread is None or unread < LAG_CHECK_FROM:
            return False
        buffer = stream.receive_buffer_bytes()
        limit = cap if buffer is None else min(cap, buffer // LAG_LIMIT_SHARE)
        if unread < limit:
            return False
        return self._lag("unread upstream", unread, limit)

    def _lag(self, what: str, size: int, limit: int) -> bool:
        self._lagged = True
        self.lag_reconnects += 1
        metrics.UPSTREAM_LAG_RECONNECTS.inc()
        log.warning(
            "bridge %s: reading fell behind (%d bytes %s, limit %d); reconnecting"
            " so the sandbox replays its scrollback rather than dropping live output",
            self.session_id,
            size,
            what,
            limit,
        )
        return True

    async def _align(self, replay: list[tuple[str, bytes]], *, complete: bool) -> bool:
        """Line a replay up with what was read (in a thread: it is linear, but up to a MiB)
        and hand the new lines over. True when it brought anything new."""
        aligned = await asyncio.to_thread(
            align,
            self._log,
            list(replay),
            stored_form,
            agent_stream=Event.Source.AGENT,
            complete=complete,
        )
        replay.clear()
        self._take(aligned)
        return bool(aligned.new)

    def _take(self, aligned: Aligned) -> None:
        events: list[NewEvent] = []
        if aligned.gap is not None:
            events.append(_gap(aligned.gap.lines_at_least, aligned.gap.first_connect))
        for source, line in aligned.new:
            event = NewEvent.from_line(source, line.text, line.data)
            self._log.add(source, event.raw)
            events.append(event)
        self._assemblers = aligned.assemblers
        self._hand_over(events)

    def _events(self, source: str, lines: list[Line]) -> list[NewEvent]:
        events = []
        for line in lines:
            event = NewEvent.from_line(source, line.text, line.data)
            self._log.add(source, event.raw)
            events.append(event)
        return events

    def _exit(self, code: int) -> None:
        events: list[NewEvent] = []
        for source, assembler in self._assemblers.items():
            events += self._events(source, assembler.flush())
        events.append(_note("exit", code=code))
        self._hand_over(events)

    # -- recording ---------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        self._index.start()
        await self._record_until_done()
        # The session is over: everything recorded is indexed before the bridge finishes.
        # (A bridge that is stopped instead leaves what it held to the next one, or, if the
        # session has ended, to a supervisor: `supervisor.finish_unfinished`.)
        await self._index.finish()
        self.complete = True

    async def _record_until_done(self) -> None:
        """Store what the parser hands over and draw what was stored, until the end is
        stored and drawn. Storing comes first while events wait (`DRAW_SHARE`)."""
        done = False
        while not done or self._undrawn.pending:
            if not done and (not self._undrawn.pending or not self._queue.empty()):
                # Up to a slice when that is all that waits (`_record` draws it as it
                # stores it), more for a flood.
                events, read_at, done = await self._next_events(STORE_SLICE)
                await self._record(events, read_at)
            if self._undrawn.pending and self._may_draw(done):
                await self._draw_next()

    async def _next_events(self, most: int) -> tuple[list[NewEvent], list[float], bool]:
        """Up to `most` of what waits (waiting for something), each event's read time, and
        whether the end came."""
        item = await self._queue.get()
        done = item is None
        events: list[NewEvent] = []
        read_at: list[float] = []
        while item is not None:
            events += item[0]
            read_at += [item[1]] * len(item[0])
            if len(events) >= most or self._queue.empty():
                break
            item = self._queue.get_nowait()
            done = item is None
        self._queued -= len(events)
        self._recorded.set()
        return events, read_at, done

    def _may_draw(self, done: bool) -> bool:
        """Whether to draw a slice now: always when nothing waits to be stored; while
        something does, within `DRAW_SHARE` of the time, and not while the search index is
        so far behind that handing it more would wait."""
        if done or self._queue.empty():
            return True
        if self._index.held_back(2):
            return False
        return self._drawing < self._storing * DRAW_SHARE / (1 - DRAW_SHARE)

    async def _record(self, events: list[NewEvent], read_at: list[float]) -> None:
        """Store in slices; draw each as it is stored unless a slice or more waits or
        something is left undrawn (a paced session: one transaction, the element written
        with its row), else store it to be drawn after (`_draw_next`)."""
        assert self.lease is not None
        loop = asyncio.get_running_loop()
        # A slice or more still waiting: a flood, not a paced session's brief queue (where
        # storing first would add a transaction to a loaded worker for nothing).
        behind = self._undrawn.pending or self._queued >= RECORD_SLICE or len(events) > RECORD_SLICE
        size = STORE_SLICE if behind else RECORD_SLICE
        for start in range(0, len(events), size):
            end = start + size
            began = loop.time()
            if behind:
                rows, state_changed = await _store(events[start:end], self.lease)
                self._undrawn.stored(rows, state_changed)
                self._storing += loop.time() - began
            else:
                rows, messages, held = await _record(events[start:end], self._tools, self.lease)
                if held:  # behind events undrawn in the database: announced in their turn
                    self._undrawn.stored(rows, bool(messages))
                else:
                    self._undrawn.announced(rows)
                    await self._announce(rows, messages)
            committed = loop.time()
            for when in read_at[start:end]:
                metrics.RECORDING_LAG.observe(committed - when)
            if any(
                row.type == "turn_complete" and row.source == Event.Source.AGENT for row in rows
            ):
                self._look_for_idleness()
        if not self._undrawn.pending:
            self._storing = self._drawing = 0.0

    async def _draw_next(self) -> None:
        """Draw the next slice of what was stored, announce it (and the state, in its
        turn), and hand it to the search index."""
        assert self.lease is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        first, last, kept = self._undrawn.next_slice(RECORD_SLICE)
        drawn = await _draw_stored(first, last, kept, self._tools, self.lease)
        due = self._undrawn.drawn(last, drawn.stored_through)
        tell = self._tell_behind()  # both: each keeps its own account
        state = await _state_now(self.session_id) if due or tell else []
        await self._announce(drawn.rows, drawn.messages + state)
        if self._undrawn.pending:
            self._drawing += loop.time() - began
        else:
            self._storing = self._drawing = 0.0

    def _tell_behind(self) -> bool:
        """Whether to announce the state now for its note of how far behind drawing is:
        at once, then at most every `TELL_BEHIND_EVERY`, and when the backlog is drawn."""
        now = asyncio.get_running_loop().time()
        if not self._undrawn.pending:
            told, self._told_behind = self._told_behind, None
            return told is not None
        if self._told_behind is None or now - self._told_behind >= TELL_BEHIND_EVERY:
            self._told_behind = now
            return True
        return False

    async def _announce(self, rows: list[Event], messages: list[Message]) -> None:
        await publish(messages)
        await self._index.hold(rows)

    # -- idleness ----------------------------------------------------------------------------

    def _look_for_idleness(self, delay: float = 0.0) -> None:
        """Look (after `delay` seconds) whether the session has come to need attention for
        sitting idle after a turn, and announce its state when it has; until it has, look
        again when it would. Each turn's end starts over."""
        if self._idle_look_at is not None:
            self._idle_look_at.cancel()
        loop = asyncio.get_running_loop()
        self._idle_look_at = loop.call_later(delay, self._start_idle_look)

    def _start_idle_look(self) -> None:
        self._idle_look_at = None
        if self._idle_looking is not None and not self._idle_looking.done():
            self._look_again = True  # what it reads may be older than what asked
            return
        self._idle_looking = asyncio.create_task(self._idle_look())

    async def _idle_look(self) -> None:
        while True:
            self._look_again = False
            try:
                messages, due = await _idle_look(self.session_id)
                await publish(messages)
            except Exception:  # a missed redraw: the pages show the note on their next change
                log.exception("bridge %s: could not look for idleness", self.session_id)
                return
            if not self._look_again:
                break
        if due is not None:
            # A little after the rule's own cutoff: the database's clock decides it.
            self._look_for_idleness(due + IDLE_LOOK_MARGIN)

    # -- control -----------------------------------------------------------------------------

    async def _control(self) -> None:
        """Keep the lease alive and carry stdin lines (configure) from any worker upstream."""
        assert self.lease is not None
        layer = get_channel_layer()
        channel = await layer.new_channel() if layer is not None else None
        if layer is not None and channel is not None:
            await layer.group_add(bridge_group(self.session_id), channel)
        loop = asyncio.get_running_loop()
        renew_at = loop.time()
        try:
            while True:
                if loop.time() >= renew_at:
                    if not await on_bridge_thread(leases.renew)(self.lease):
                        raise LeaseLost(self.session_id)
                    renew_at = loop.time() + leases.RENEW_SECONDS
                wait = max(0.0, renew_at - loop.time())
                if layer is None or channel is None:
                    await asyncio.sleep(wait)
                    continue
                try:
                    message = await asyncio.wait_for(layer.receive(channel), wait)
                except TimeoutError:
                    continue
                if message.get("type") == "bridge.stdin":
                    await self._send_stdin(message)
        finally:
            if layer is not None and channel is not None:
                with contextlib.suppress(Exception):
                    await layer.group_discard(bridge_group(self.session_id), channel)

    async def _send_stdin(self, message: dict[str, Any]) -> None:
        assert self.lease is not None
        line = message.get("line")
        if not isinstance(line, dict):
            return
        request_id = str(message.get("id", ""))
        if request_id and request_id in self._sent:
            await acknowledge(message.get("reply"), self._sent[request_id])
            return
        if not await on_bridge_thread(leases.renew)(self.lease):
            raise LeaseLost(self.session_id)  # the fence: a stale owner sends nothing
        problem = None
        if self._stream is None:
            problem = "the bridge is reconnecting to the sandbox"
        else:
            try:
                await self._stream.send_line(line)
            except OpenComputerError as exc:
                log.warning("bridge %s: stdin not delivered: %s", self.session_id, exc)
                problem = "the connection to the sandbox broke"
        if request_id:
            self._sent[request_id] = problem
            while len(self._sent) > 100:
                self._sent.pop(next(iter(self._sent)))
        await acknowledge(message.get("reply"), problem)


def _note(kind: str, **details: Any) -> NewEvent:
    return NewEvent.ours(Event.Source.BRIDGE, {"type": kind, **details})


def _gap(lines_at_least: int, first_connect: bool) -> NewEvent:
    where = "before Porthole attached" if first_connect else "while the connection was down"
    amount = (
        f"at least {lines_at_least} line{'s' if lines_at_least != 1 else ''} (possibly more) are"
        if lines_at_least
        else "an unknown amount of output is"
    )
    return _note(
        "gap",
        lines_at_least=lines_at_least,
        first_connect=first_connect,
        message=f"Output was evicted from the sandbox's scrollback {where}: {amount} missing here.",
    )
