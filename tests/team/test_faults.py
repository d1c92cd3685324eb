"""Real worker processes, really killed, paused and stopped, on PostgreSQL and Redis.

- SIGKILL of a session's bridge owner: another worker takes it over within 15 s, and what
  the agent printed is stored exactly once (the 1 MiB ring covers the gap); killed behind
  a flood, what it stored and never drew is drawn by the next.
- SIGSTOP of the owner inside a recording transaction, for longer than the lease: the
  other worker keeps supervising every other session, and once woken the stale owner
  writes nothing (nothing doubled).
- SIGTERM of a worker (web and bridges, `manage.py serve`) behind nginx: its viewers
  reconnect through nginx to the other and see every event exactly once; its session moves
  on within seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from typing import Any

import psycopg
import pytest
import websockets
from django.contrib.auth.models import User
from django.db import connection, connections

from dashboard.agents import actions, leases
from dashboard.agents.models import AgentSession, Event
from tests.agents.helpers import cookie_for
from tests.agents.test_bridge import _printed
from tests.conftest import LocalSandbox
from tests.team.procs import Proc, Team, database_url, wait_until

pytestmark = [pytest.mark.team, pytest.mark.timeout(300)]

TAKEOVER_SECONDS = 15.0
SEQ = re.compile(r'id="event-(\d+)"')


def start_session(user: User, prompt: str) -> AgentSession:
    try:
        return asyncio.run(actions.start_session(user, prompt=prompt, options={}))
    finally:
        connections.close_all()


def holder(session: AgentSession) -> str:
    """The worker holding the session's lease now (by the database's clock), or ""."""
    if not leases.held(session.id):
        return ""
    return str(AgentSession.objects.values_list("bridge_owner", flat=True).get(id=session.id))


def finished(session: AgentSession) -> bool:
    status = AgentSession.objects.values_list("status", flat=True).get(id=session.id)
    return status in AgentSession.FINISHED_STATUSES


def stored_lines(session: AgentSession) -> list[str]:
    return list(
        Event.objects.filter(session=session, source=Event.Source.AGENT)
        .order_by("seq")
        .values_list("raw", flat=True)
    )


def printed_lines(oc: LocalSandbox, session: AgentSession) -> list[str]:
    try:
        return asyncio.run(_printed(oc, session.sandbox.upstream_id, session.upstream_id))
    finally:
        connections.close_all()


def assert_recorded_exactly_once(oc: LocalSandbox, session: AgentSession) -> None:
    session = AgentSession.objects.select_related("sandbox").get(id=session.id)
    seqs = list(Event.objects.filter(session=session).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1)), "seqs have holes or repeats"
    stored, printed = stored_lines(session), printed_lines(oc, session)
    # Read back from a fresh attach, which replays the sandbox's 1 MiB ring: it starts with
    # the agent's first line only if the session printed less than that.
    assert printed[:1] == ['{"type": "ready"}'], "the ring wrapped: print less in this test"
    assert len(stored) == len(printed), (len(stored), len(printed))
    assert stored == printed
    gaps = list(Event.objects.filter(session=session, type="gap").values_list("seq", "raw"))
    assert not gaps, f"a gap was recorded: {gaps}"


def owner_and_other(procs: list[Proc], owner: str) -> tuple[Proc, Proc]:
    first, second = procs
    return (first, second) if first.name == owner else (second, first)


# -- SIGKILL --------------------------------------------------------------------------------------


def test_it_takes_over_a_killed_owners_session_within_15_seconds(
    crew_oc: Team, oc: LocalSandbox, alice: User
) -> None:
    a, b = crew_oc.bridges("bridges-a"), crew_oc.bridges("bridges-b")
    session = start_session(alice, "sleep 20\nafter the takeover\nexit 0")
    owner = wait_until(lambda: holder(session), 30, "a bridges worker to hold the session")
    victim, survivor = owner_and_other([a, b], owner)
    wait_until(
        lambda: Event.objects.filter(session=session, type="assistant").count() >= 3,
        30,
        "some output recorded before the kill",
    )

    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(
        lambda: holder(session) == survivor.name,
        TAKEOVER_SECONDS,
        f"{survivor.name} to take the session over (killed {victim.name})",
    )
    took = time.monotonic() - killed
    wait_until(lambda: finished(session), 90, "the session to finish")
    assert_recorded_exactly_once(oc, session)
    assert AgentSession.objects.get(id=session.id).status == AgentSession.Status.EXITED
    print(f"takeover after SIGKILL: {took:.1f} s")  # noqa: T201 - seen with -s, for docs


def _undrawn(session: AgentSession) -> int:
    """How many events the session's bridge has stored and not drawn yet."""
    row = AgentSession.objects.values_list("next_seq", "undrawn_from").get(id=session.id)
    return 0 if row[1] is None else row[0] - row[1]


def test_it_draws_what_a_killed_owner_stored_and_never_drew(
    crew_oc: Team, oc: LocalSandbox, alice: User
) -> None:
    """SIGKILL of an owner behind a flood, with hundreds of events stored and not yet drawn
    (it stores first): the worker that takes over draws them, each kept with its element,
    before what the agent says next; nothing is stored twice or lost."""
    a, b = crew_oc.bridges("bridges-a"), crew_oc.bridges("bridges-b")
    # 2,000 lines of about 440 bytes: within the ring, which the check reads back.
    session = start_session(alice, "flood 2000 40\nsleep 5\nafter the takeover\nexit 0")
    owner = wait_until(lambda: holder(session), 30, "a bridges worker to hold the session")
    victim, survivor = owner_and_other([a, b], owner)
    wait_until(lambda: _undrawn(session) >= 300, 60, "the owner to fall behind the flood")

    victim.signal(signal.SIGSTOP)  # what it left undrawn stays so: no commit comes after
    left = _undrawn(session)
    victim.signal(signal.SIGKILL)
    wait_until(
        lambda: holder(session) == survivor.name,
        TAKEOVER_SECONDS,
        f"{survivor.name} to take the session over (killed {victim.name})",
    )
    wait_until(lambda: finished(session), 90, "the session to finish")
    # The exit is stored (the session has finished) before what came before it is drawn.
    wait_until(lambda: _undrawn(session) == 0, 60, "the rest to be drawn")

    assert left >= 300
    assert_recorded_exactly_once(oc, session)
    texts = Event.objects.filter(session=session, type="assistant")
    assert texts.count() >= 2001
    assert not texts.filter(html__isnull=True).exists(), "an event drawn never, or not kept"


# -- SIGSTOP inside a transaction -----------------------------------------------------------------


def _in_transaction(application_name: str) -> bool:
    """Whether the worker's database session is inside a transaction right now."""
    with psycopg.connect(database_url(), autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND xact_start IS NOT NULL AND state IN ('active', 'idle in transaction')",
            (application_name,),
        ).fetchone()
    return bool(row and row[0])


def _pause_inside_a_transaction(worker: Proc, attempts: int = 2000) -> None:
    """SIGSTOP the worker at a moment its database session is inside a transaction."""
    for _ in range(attempts):
        if _in_transaction(worker.name):
            worker.signal(signal.SIGSTOP)
            if _in_transaction(worker.name):
                return
            worker.signal(signal.SIGCONT)
    raise AssertionError(f"never caught {worker.name} inside a transaction")


def test_it_keeps_supervising_everything_while_an_owner_is_frozen_in_a_transaction(
    crew_oc: Team, oc: LocalSandbox, alice: User
) -> None:
    def named(name: str) -> dict[str, str]:
        # The worker's name on its database sessions, to see its transactions from outside.
        return {"DATABASE_URL": f"{database_url()}?application_name={name}"}

    a = crew_oc.bridges("bridges-a", named("bridges-a"))
    b = crew_oc.bridges("bridges-b", named("bridges-b"))
    # A busy session (floods: its owner is in recording transactions much of the time, and
    # all it prints stays within the 1 MiB ring)
    # and a quiet one.
    # (2 × 900 lines of about 440 bytes: the ring must hold it all, since what is printed is
    # read back from a fresh attach, which replays the ring).
    busy = start_session(alice, "flood 900 40\nsleep 12\nflood 900 40\nexit 0")
    quiet = start_session(alice, "sleep 30\nexit 0")
    owner = wait_until(lambda: holder(busy), 30, "a worker to hold the busy session")
    frozen, other = owner_and_other([a, b], owner)
    wait_until(lambda: holder(quiet), 30, "a worker to hold the quiet session")

    _pause_inside_a_transaction(frozen)
    paused = time.monotonic()
    try:
        # A session started now is supervised by the other worker at once…
        fresh = start_session(alice, "sleep 3\nexit 0")
        wait_until(lambda: holder(fresh) == other.name, TAKEOVER_SECONDS, "the new session")
        # …and every session the frozen one held moves over within the takeover bound.
        for session in (busy, quiet):
            wait_until(
                lambda s=session: holder(s) == other.name,  # type: ignore[misc]
                TAKEOVER_SECONDS,
                f"{other.name} to hold {session.id} while {frozen.name} is frozen",
            )
        # Frozen for longer than a lease, for sure.
        wait_until(
            lambda: time.monotonic() - paused > leases.LEASE_SECONDS + 2, 30, "a lease's time"
        )
    finally:
        frozen.signal(signal.SIGCONT)
    for session in (busy, quiet, fresh):
        wait_until(lambda s=session: finished(s), 120, f"{session.id} to finish")  # type: ignore[misc]
    # The stale owner woke up mid-transaction and wrote nothing: nothing doubled, nothing lost.
    for session in (busy, quiet, fresh):
        assert_recorded_exactly_once(oc, session)
    assert frozen.process.poll() is None, frozen.problems()


# -- SIGTERM of a worker behind nginx -------------------------------------------------------------


async def off_loop(work: Any, *args: Any) -> Any:
    """Blocking work (the ORM, waits) off the event loop, its database connection closed."""

    def run() -> Any:
        try:
            return work(*args)
        finally:
            connections.close_all()

    return await asyncio.to_thread(run)


async def _watch_until(
    url: str, headers: dict[str, str], done: asyncio.Event, seen: list[int]
) -> None:
    """A viewer as the page is: reconnect after any close, say the last seq held."""
    while not done.is_set():
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=20) as ws:
                await ws.send(json.dumps({"last_seq": seen[-1] if seen else 0}))
                while not done.is_set():
                    try:
                        frame = await asyncio.wait_for(ws.recv(), 0.5)
                    except TimeoutError:
                        continue
                    seen.extend(int(s) for s in SEQ.findall(str(frame)))
        except (OSError, websockets.WebSocketException, TimeoutError):
            await asyncio.sleep(0.2)  # the page's reconnect backoff, much shortened


def test_it_moves_viewers_and_sessions_off_a_worker_stopped_with_sigterm(
    crew_oc: Team, oc: LocalSandbox, alice: User
) -> None:
    w1, w2 = crew_oc.serve("serve-1"), crew_oc.serve("serve-2")
    proxy = crew_oc.nginx([w1, w2])
    session = start_session(alice, "sleep 20\nafter the move\nexit 0")
    owner = wait_until(lambda: holder(session), 30, "a worker to hold the session")
    victim = w1 if owner.endswith(f":{w1.port}") else w2
    survivor = w2 if victim is w1 else w1
    url = f"ws://127.0.0.1:{proxy.port}/ws/sessions/{session.id}/"
    headers = {"Origin": proxy.url, "Cookie": cookie_for(alice).decode()}
    connection.close()

    async def scenario() -> tuple[list[list[int]], float]:
        done = asyncio.Event()
        seen: list[list[int]] = [[] for _ in range(4)]
        viewers = [asyncio.create_task(_watch_until(url, headers, done, seen[i])) for i in range(4)]
        await off_loop(
            wait_until, lambda: all(len(s) >= 3 for s in seen), 30, "viewers to see events"
        )
        victim.signal(signal.SIGTERM)
        stopped = time.monotonic()
        await off_loop(
            wait_until,
            lambda: holder(session).endswith(f":{survivor.port}"),
            TAKEOVER_SECONDS,
            "the surviving worker to hold the session",
        )
        moved = time.monotonic() - stopped
        await off_loop(wait_until, lambda: finished(session), 90, "the session to end")
        last = await off_loop(
            lambda: (
                Event.objects.filter(session=session)
                .order_by("-seq")
                .values_list("seq", flat=True)[0]
            )
        )
        await off_loop(
            wait_until, lambda: all(s and s[-1] >= last for s in seen), 30, "viewers to catch up"
        )
        done.set()
        await asyncio.gather(*viewers)
        return seen, moved

    seen, moved = asyncio.run(scenario())
    connections.close_all()
    assert victim.process.wait(timeout=30) == 0, victim.problems()
    last = Event.objects.filter(session=session).count()
    for seqs in seen:
        assert seqs == list(range(1, last + 1)), "each viewer sees every event exactly once"
    assert_recorded_exactly_once(oc, session)
    # At least one viewer was on the stopped worker (nginx logs which upstream served it).
    access_log = (crew_oc.data_dir / "nginx" / "access.log").read_text()
    assert re.search(rf"/ws/sessions/{session.id}/.* 127\.0\.0\.1:{victim.port}\b", access_log)
    print(f"session moved {moved:.1f} s after SIGTERM")  # noqa: T201


def test_it_records_a_flood_from_its_first_byte_without_a_gap(
    crew_oc: Team, oc: LocalSandbox, alice: User
) -> None:
    crew_oc.bridges("bridges-a")
    session = start_session(alice, "flood 1200 40\nexit 0")
    wait_until(lambda: finished(session), 60, "the session to finish")
    assert_recorded_exactly_once(oc, session)
