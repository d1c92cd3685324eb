"""Porthole: the same flood recorded by a `Bridge` and fanned out to viewers.

Everything runs in this process, as in `manage.py serve`: the bridge (reader and recorder),
the in-memory channel layer, and the viewers, each a `SessionConsumer` reached through the
real ASGI application (`dashboard.asgi.application`: origin check, cookie session, routing)
with `channels.testing.WebsocketCommunicator`. A viewer notes when each fragment arrived and
which `data-seq`s it carried; after the run, every seq is matched with the
`demo_emitted_at` in the raw line the bridge stored.

A reading viewer acknowledges what it got, as the page does. A *stalled* viewer connects
and says hello like the others, then never reads nor acknowledges: the consumer sends it at
most its flow-control window (`dashboard/agents/viewers.py`), and that is what waits in the
communicator's output queue.

`setup()` must run before anything imports Django models.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import Clock, PeakRSS, flood_prompt, percentiles

OWNER = "bench-worker"
DATA_SEQ = re.compile(r'data-seq="(\d+)"')
DELIVERY_TIMEOUT = 120.0


def setup(data_dir: Path, api_url: str, api_key: str, database_url: str | None) -> str:
    """Configure Django for a throwaway database, migrate it; the database vendor."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "dashboard.settings"
    os.environ["PORTHOLE_DATA_DIR"] = str(data_dir)
    os.environ["OPENCOMPUTER_API_URL"] = api_url
    os.environ["OPENCOMPUTER_API_KEY"] = api_key
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.pop("REDIS_URL", None)  # the in-memory channel layer, as in embedded mode
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    from django.db import connection

    vendor = connection.vendor
    connection.close()  # the thread that runs the bridge's queries opens its own
    return vendor


# -- database helpers --------------------------------------------------------------------------


def _db(fn):  # type: ignore[no-untyped-def]
    from channels.db import database_sync_to_async

    return database_sync_to_async(fn)


def _user_and_cookie() -> bytes:
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.test import Client

    from dashboard.agents.access import set_role

    user, _ = User.objects.get_or_create(username="bench")
    set_role(user, "operator")  # watches and steers, like the person who started the session
    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}".encode()


def _new_session(sandbox_id: str) -> Any:
    from django.utils import timezone

    from dashboard.agents.models import AgentSession, Sandbox

    sandbox = Sandbox.objects.create(upstream_id=sandbox_id, metadata={"purpose": "bench"})
    return AgentSession.objects.create(
        sandbox=sandbox,
        upstream_id="pending",
        title="bench",
        bridge_owner=OWNER,
        bridge_lease_until=timezone.now() + timedelta(seconds=600),
    )


def _set_upstream(session_id: object, upstream_id: str) -> None:
    from dashboard.agents.models import AgentSession

    AgentSession.objects.filter(id=session_id).update(upstream_id=upstream_id)


def _stored(session_id: object) -> dict[str, Any]:
    """What the bridge stored: seq → emitted time and store time, counts, batches."""
    from dashboard.agents.models import AgentSession, Event

    session = AgentSession.objects.get(id=session_id)
    emitted: dict[int, float] = {}
    stored_at: dict[int, float] = {}
    kinds: Counter[str] = Counter()
    batches: Counter[float] = Counter()
    stdout_bytes = flood_bytes = 0
    rows = (
        Event.objects.filter(session_id=session_id)
        .order_by("seq")
        .values_list("seq", "source", "type", "raw", "created_at")
    )
    for seq, source, kind, raw, created_at in rows.iterator(chunk_size=2000):
        kinds[f"{source}:{kind}"] += 1
        batches[created_at.timestamp()] += 1  # one `now` per append transaction
        if source == Event.Source.AGENT:
            stdout_bytes += len(raw.encode()) + 1
            if '"demo_emitted_at"' in raw:
                emitted[seq] = json.loads(raw)["demo_emitted_at"]
                stored_at[seq] = created_at.timestamp()
                flood_bytes += len(raw.encode()) + 1
    return {
        "status": session.status,
        "exit_code": session.exit_code,
        "last_seq": session.next_seq - 1,
        "emitted": emitted,
        "stored_at": stored_at,
        "kinds": dict(kinds),
        "transactions": len(batches),
        "largest_transaction": max(batches.values(), default=0),
        "stdout_bytes": stdout_bytes,
        "flood_bytes": flood_bytes,
    }


def _warm_up(sandbox_id: str) -> None:
    """What a running server has already done once: load and compile the templates, open
    the database connection, import the markdown renderer. Recorded on a session of its
    own, then deleted."""
    from dashboard.agents.recording import NewEvent, record

    session = _new_session(sandbox_id + "-warm-up")
    lines = [
        {"type": "ready"},
        {"type": "system", "subtype": "init", "session_id": "warm", "model": "demo"},
        {
            "type": "assistant",
            "message": {"role": "assistant", "content": [{"type": "text", "text": "**hi**"}]},
            "parent_tool_use_id": None,
            "demo_emitted_at": time.time(),
        },
        {"type": "result", "subtype": "success", "result": "hi", "num_turns": 1},
        {"type": "turn_complete", "claude_session_id": "warm"},
    ]
    events = [NewEvent.from_line("agent", json.dumps(line), line) for line in lines]
    record(session.id, events, lease_owner=OWNER)
    _cleanup(session.id)


def _unit_costs(session_id: object, sandbox_id: str, limit: int = 2000) -> dict[str, float]:
    """Per-event cost of each step of `record`, measured alone (no concurrency), on copies of
    the flood lines just recorded: microseconds per event."""
    from django.db import connection

    from dashboard.agents.models import Event
    from dashboard.agents.recording import NewEvent, append_events, record
    from dashboard.agents.rendering import ToolIndex, describe, render_event_oob

    raws = list(
        Event.objects.filter(session_id=session_id, type="assistant")
        .order_by("seq")
        .values_list("raw", flat=True)[:limit]
    )
    count = len(raws) or 1
    costs: dict[str, float] = {"events": len(raws)}

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        value = fn()
        costs[name] = (time.perf_counter() - start) / count * 1e6
        return value

    parsed = timed("json_parse_us", lambda: [json.loads(raw) for raw in raws])
    new = [NewEvent.from_line("agent", raw, data) for raw, data in zip(raws, parsed, strict=True)]

    batch = _new_session(sandbox_id + "-costs-batch")
    appended = timed("store_in_one_transaction_us", lambda: append_events(batch.id, new))
    rows = appended.events
    for row in rows:
        row.session = appended.session
    tools = ToolIndex()
    timed("describe_us", lambda: [describe(row, tools) for row in rows])
    timed("render_event_oob_us", lambda: [render_event_oob(row, tools) for row in rows])

    single = _new_session(sandbox_id + "-costs-single")
    few = new[:200]
    start = time.perf_counter()
    for event in few:
        append_events(single.id, [event])
    costs["store_one_per_transaction_us"] = (time.perf_counter() - start) / len(few) * 1e6
    start = time.perf_counter()
    for event in few:
        # As a bridge records: its search index is written later, several batches at once.
        record(single.id, [event], tools=ToolIndex(), index=False)
    costs["record_one_per_call_us"] = (time.perf_counter() - start) / len(few) * 1e6
    costs["statements"] = _statements_of_one_event(single.id, few)  # type: ignore[assignment]
    costs["database"] = connection.vendor  # type: ignore[assignment]
    _cleanup(batch.id)
    _cleanup(single.id)
    return costs


def _statements_of_one_event(session_id: object, events: list[Any]) -> dict[str, float]:
    """What a one-event `record` sends to the database: per kind of statement (its verb and
    table), the milliseconds it takes per record, wall clock, as the caller sees them
    (round trip, the server's work and the driver's), and the rest of the call."""
    from django.db import connection

    from dashboard.agents.recording import record
    from dashboard.agents.rendering import ToolIndex

    spent: dict[str, float] = {}

    def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        began = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            kind = _kind(sql)
            spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - began

    tools = ToolIndex()
    began = time.perf_counter()
    with connection.execute_wrapper(timed):
        for event in events:
            record(session_id, [event], tools=tools, index=False)  # as a bridge records
    total = time.perf_counter() - began
    per_record = {kind: seconds / len(events) * 1e3 for kind, seconds in spent.items()}
    # The commit (and PostgreSQL's BEGIN) is not a statement the wrapper sees.
    per_record["the rest (Python, commit)"] = total / len(events) * 1e3 - sum(per_record.values())
    return per_record


def _kind(sql: str) -> str:
    """A statement's verb and table ("INSERT agents_event"), or its first words; a `WITH`
    statement (the session's row lock on PostgreSQL) by the first table it names."""
    words = sql.split()
    if words[0] in ("SAVEPOINT", "RELEASE", "ROLLBACK"):
        return words[0]  # the savepoint's name changes every time
    named = words[1:] if words[0] == "WITH" else words[1:6]
    table = next((word.strip('"') for word in named if word.startswith('"')), "")
    return f"{words[0]} {table or ' '.join(words[1:2])[:30]}"


def _cleanup(session_id: object) -> None:
    from dashboard.agents.models import AgentSession

    session = AgentSession.objects.filter(id=session_id).select_related("sandbox").first()
    if session is not None:
        session.sandbox.delete()  # the session and its events go with it


# -- viewers ---------------------------------------------------------------------------------


class Viewer:
    """One browser tab, through the real ASGI application."""

    def __init__(self, session_id: object, cookie: bytes) -> None:
        from channels.testing import WebsocketCommunicator

        from dashboard.asgi import application

        self.communicator = WebsocketCommunicator(
            application,
            f"/ws/sessions/{session_id}/",
            headers=[
                (b"origin", b"http://localhost"),
                (b"cookie", cookie),
                (b"host", b"localhost"),
            ],
        )
        self.arrivals: list[tuple[float, list[int]]] = []
        self.messages = 0
        self.chars = 0
        self.last_seq = 0
        self.acked = 0
        self.acked_at = 0.0
        self.target: int | None = None
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        connected, code = await self.communicator.connect(timeout=30)
        if not connected:
            raise RuntimeError(f"the viewer was refused (close code {code})")
        await self.communicator.send_json_to({"last_seq": 0})
        await self.communicator.receive_from(timeout=30)  # the header, controls, watchers

    def start_reading(self) -> None:
        self._task = asyncio.create_task(self._read(), name="bench-viewer")

    async def _read(self) -> None:
        while True:
            # No short timeout: on a timeout the communicator cancels the application.
            message = await self.communicator.receive_output(timeout=3600)
            now = time.time()
            if message["type"] != "websocket.send":
                return
            text = message.get("text") or ""
            self.messages += 1
            self.chars += len(text)
            seqs = [int(seq) for seq in DATA_SEQ.findall(text)]
            if seqs:
                self.arrivals.append((now, seqs))
                self.last_seq = max(self.last_seq, seqs[-1])
                # Acknowledge like the page (static/porthole/app.js): the consumer sends at
                # most a window of events past the last acknowledgement.
                if self.last_seq - self.acked >= 250 or now - self.acked_at >= 1.0:
                    self.acked, self.acked_at = self.last_seq, now
                    await self.communicator.send_json_to({"ack": self.last_seq})
            self._check()

    def _check(self) -> None:
        if self.target is not None and self.last_seq >= self.target:
            self.done.set()

    async def wait_for(self, seq: int, timeout: float) -> bool:
        self.target = seq
        self._check()
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def backlog(self) -> dict[str, int]:
        """What waits, unread, in the output queue (a stalled viewer's pile)."""
        queue = self.communicator.output_queue
        pending = list(getattr(queue, "_queue", ()))
        texts = [m.get("text") or "" for m in pending]
        return {
            "messages": len(pending),
            "chars": sum(len(text) for text in texts),
            "events": sum(len(DATA_SEQ.findall(text)) for text in texts),
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(BaseException):
            await self.communicator.disconnect(timeout=5)


def _viewer_report(
    viewer: Viewer, stored: dict[str, Any], published: dict[int, float]
) -> dict[str, Any]:
    emitted = stored["emitted"]
    seen: list[int] = []
    latencies: list[float] = []
    after_publish: list[float] = []
    last_flood = max(emitted, default=0)
    last_flood_arrival = 0.0
    for arrived, seqs in viewer.arrivals:
        seen += seqs
        for seq in seqs:
            if seq in emitted:
                latencies.append(arrived - emitted[seq])
                if seq in published:
                    after_publish.append(arrived - published[seq])
            if seq == last_flood:
                last_flood_arrival = arrived
    return {
        "exactly_once_in_order": seen == list(range(1, stored["last_seq"] + 1)),
        "events": len(seen),
        "messages": viewer.messages,
        "mb_received": viewer.chars / 2**20,
        "latency": percentiles(latencies),
        "published_to_viewer": percentiles(after_publish),
        "_latencies": latencies,
        "_last_flood_arrival": last_flood_arrival,
    }


# -- profiling -------------------------------------------------------------------------------


class Profiles:
    """cProfile over the measured section. On Python 3.12+ cProfile rides on `sys.monitoring`,
    which sees every thread: the event loop and the thread that runs database work
    (`database_sync_to_async` is thread-sensitive: one executor thread) land in one profile.
    Own times are right; callers across a thread switch can be misattributed."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()

    async def enable(self) -> None:
        self.profile.enable()

    async def disable(self) -> None:
        self.profile.disable()

    def report(self, directory: Path, top: int = 40) -> dict[str, str]:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "porthole.pstats"
        self.profile.dump_stats(path)
        out: dict[str, str] = {"file": str(path)}
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            stats = pstats.Stats(self.profile, stream=text)
            stats.sort_stats(order).print_stats(top)
            out[order] = text.getvalue()
        return out


# -- the run -------------------------------------------------------------------------------


def _timed_bridge(session_id: str, max_batch: int = 0) -> Any:
    """A `Bridge` that notes when it last stored, and when each of its batches was drawn
    and announced (a bridge that falls behind stores first and draws after).

    The bridge is the only writer during a run, so its batches cover consecutive seqs.
    Diagnostic: with `max_batch`, what the recorder takes is recorded in slices of at most
    that many events."""
    from dashboard.agents.bridge import Bridge

    class TimedBridge(Bridge):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.batches: list[tuple[float, int]] = []  # (published at, events)
            self.stored_at: float | None = None

        async def _record(self, events: list[Any], read_at: list[float]) -> None:
            step = max_batch or len(events) or 1
            for start in range(0, len(events), step):
                part = events[start : start + step]
                await super()._record(part, read_at[start : start + step])
                if part:
                    self.stored_at = time.time()

        async def _announce(self, rows: list[Any], messages: list[Any]) -> None:
            await super()._announce(rows, messages)
            if rows:
                self.batches.append((time.time(), len(rows)))

    return TimedBridge(session_id, OWNER)


def _published_at(batches: list[tuple[float, int]], last_seq: int) -> dict[int, float]:
    if sum(count for _, count in batches) != last_seq:
        return {}  # someone else wrote too: the batches no longer map to seqs
    published: dict[int, float] = {}
    seq = 0
    for at, count in batches:
        for _ in range(count):
            seq += 1
            published[seq] = at
    return published


async def run(
    events: int,
    size: int,
    viewers: int,
    stalled: int = 0,
    profile_dir: Path | None = None,
    pace: float = 0.0,
    bridge_thread: bool = False,
    max_batch: int = 0,
) -> dict[str, Any]:
    from dashboard.agents import upstream

    client = upstream.client()
    cookie = await _db(_user_and_cookie)()
    info = await client.create_sandbox(metadata={"purpose": "bench"})
    await _db(_warm_up)(info.sandbox_id)
    session = await _db(_new_session)(info.sandbox_id)
    readers = [Viewer(session.id, cookie) for _ in range(viewers)]
    idle = [Viewer(session.id, cookie) for _ in range(stalled)]
    for viewer in readers + idle:
        await viewer.open()
    for viewer in readers:
        viewer.start_reading()

    from django.db.backends.signals import connection_created

    opened: list[float] = []

    def count_connection(**_: Any) -> None:
        opened.append(time.time())

    connection_created.connect(count_connection, weak=False)
    sessions_before = await _db(_server_sessions)()
    profiles = Profiles() if profile_dir is not None else None
    memory = PeakRSS()
    bridge = _timed_bridge(str(session.id), max_batch)
    try:
        if profiles is not None:
            await profiles.enable()
        memory.start()
        clock = Clock()
        agent = await client.start_agent(info.sandbox_id, prompt=flood_prompt(events, size, pace))
        await _db(_set_upstream)(session.id, agent.session_id)
        if bridge_thread:
            await _run_in_own_thread(bridge)
        else:
            await bridge.run()
        stored_s = (bridge.stored_at or time.time()) - clock.wall0
        last_seq = await _db(_stored_last_seq)(session.id)
        delivered = [await viewer.wait_for(last_seq, DELIVERY_TIMEOUT) for viewer in readers]
        delivered_s = clock.elapsed()
        mem = memory.stop()
        if profiles is not None:
            await profiles.disable()
        piles = [viewer.backlog() for viewer in idle]
        connections_opened = len(opened)
    finally:
        connection_created.disconnect(count_connection)
        for viewer in readers + idle:
            await viewer.close()
        with contextlib.suppress(Exception):
            await client.kill_sandbox(info.sandbox_id)

    sessions_after = await _db(_server_sessions)()
    stored = await _db(_stored)(session.id)
    emitted = stored["emitted"]
    flood = sorted(emitted)
    published = _published_at(bridge.batches, stored["last_seq"])
    first_emitted = emitted[flood[0]] if flood else clock.wall0
    reports = [_viewer_report(viewer, stored, published) for viewer in readers]
    latencies = [lat for report in reports for lat in report.pop("_latencies")]
    last_arrivals = [report.pop("_last_flood_arrival") for report in reports]
    # Stored: until the bridge stored the last of it (and the exit after it); announced:
    # until its last event was drawn and sent (a bridge that fell behind draws after).
    window = (bridge.stored_at or time.time()) - first_emitted
    announced = (published[flood[-1]] - first_emitted) if flood and published else window
    result: dict[str, Any] = {
        "exit_code": stored["exit_code"],
        "status": stored["status"],
        "stored_s": stored_s,
        "delivered_s": delivered_s,
        "all_delivered": all(delivered),
        "flood_events": len(flood),
        "events_stored": stored["last_seq"],
        "flood_window_s": window,
        "events_per_s": len(flood) / window,
        "announced_events_per_s": len(flood) / announced,
        "viewer_events_per_s": (
            len(flood) / (max(last_arrivals) - first_emitted) if all(last_arrivals) else 0
        ),
        "stdout_bytes": stored["stdout_bytes"],
        "flood_bytes": stored["flood_bytes"],
        "mb_per_s": stored["flood_bytes"] / 2**20 / window,
        "transactions": len(bridge.batches),
        "largest_transaction": max((count for _, count in bridge.batches), default=0),
        "event_kinds": stored["kinds"],
        "emit_to_transaction": percentiles(
            stored["stored_at"][seq] - emitted[seq] for seq in flood
        ),
        "emit_to_published": percentiles(
            published[seq] - emitted[seq] for seq in flood if seq in published
        ),
        "latency": percentiles(latencies),
        "published_to_viewer": percentiles(
            arrived - published[seq]
            for viewer in readers
            for arrived, seqs in viewer.arrivals
            for seq in seqs
            if seq in emitted and seq in published
        ),
        "viewers": reports,
        "memory": mem,
        "connections": bridge.connections,
        "db_connections_opened": connections_opened,
        # With PostgreSQL's pool, `connection_created` fires for every connection lent.
        "db_pooled": _pooled(),
        # Seen by PostgreSQL itself, viewers' and the bench's own included (less the one
        # that asks, unless the pool lent it): None on SQLite.
        "db_server_sessions": (
            sessions_after - sessions_before - (0 if _pooled() else 1)
            if sessions_after is not None and sessions_before is not None
            else None
        ),
    }
    if idle:
        result["stalled"] = piles
    if profiles is not None and profile_dir is not None:
        result["profile"] = profiles.report(profile_dir)
        result["unit_costs"] = await _db(_unit_costs)(session.id, info.sandbox_id)
    await _db(_cleanup)(session.id)
    await client.aclose()
    return result


async def _run_in_own_thread(bridge: Any) -> None:
    """Diagnostic (`--bridge-thread`): the bridge's database work, rendering included, on a
    thread of its own instead of the process-wide thread that every consumer also waits on
    (Channels runs `close_old_connections` there before handling each message)."""
    from asgiref.sync import ThreadSensitiveContext
    from django.db import connections

    async with ThreadSensitiveContext():
        try:
            await bridge.run()
        finally:
            await _db(connections.close_all)()


def _pooled() -> bool:
    from django.conf import settings

    return bool(settings.DATABASES["default"].get("OPTIONS", {}).get("pool"))


def _server_sessions() -> int | None:
    """On PostgreSQL, how many connections the server has seen to this database (its own
    count, whoever opened them); None elsewhere. Backends report their counters within a
    second or so of going idle, hence the pause before reading."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    time.sleep(1.5)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        row = cursor.fetchone()
    return int(row[0]) if row else None


def _stored_last_seq(session_id: object) -> int:
    from dashboard.agents.models import AgentSession

    return AgentSession.objects.get(id=session_id).next_seq - 1
