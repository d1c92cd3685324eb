"""The "needs attention" rule on each kind of ending, stored through the real recording path;
and, end to end, the demo agent's failures recorded by a real bridge."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.awareness import attention
from dashboard.opencomputer import OpenComputer
from tests.agents.helpers import wait_for
from tests.awareness.helpers import agent, new_session, ours, record, result, turn

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]


def reasons(session: AgentSession, *, now: object = None) -> tuple[str, ...]:
    annotated = attention.with_attention(
        AgentSession.objects.filter(pk=session.pk),
        now=now,  # type: ignore[arg-type]
    ).get()
    return attention.of(annotated).reasons


def later() -> object:
    return timezone.now() + attention.idle_threshold() + timedelta(seconds=5)


def test_it_leaves_a_successful_turn_alone():
    session = turn(new_session(status=AgentSession.Status.IDLE))
    assert session.status == AgentSession.Status.IDLE
    assert reasons(session) == ()
    assert not attention.needing_attention().exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"subtype": "error_during_execution", "is_error": True},
        {"subtype": "error_max_turns", "is_error": False},
        # An API error: the SDK says success, but is_error.
        {"subtype": "success", "is_error": True},
    ],
)
def test_it_flags_a_turn_that_ended_with_an_error_result(fields):
    session = turn(new_session(), **fields)
    assert reasons(session) == ("error",)
    assert list(attention.needing_attention()) == [session]


def test_it_flags_an_error_line_from_the_wrapper():
    session = record(
        new_session(),
        ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go"}),
        agent({"type": "error", "message": "ANTHROPIC_API_KEY is not set"}),
        agent({"type": "turn_complete"}),
    )
    assert reasons(session) == ("error",)


def test_it_ignores_is_error_quoted_inside_the_result_text():
    session = turn(new_session(), text='the log said "is_error": true')
    assert reasons(session) == ()


def test_it_clears_an_error_once_someone_follows_up():
    session = turn(new_session(), subtype="error_during_execution", is_error=True)
    assert reasons(session) == ("error",)
    session = record(session, ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "retry"}))
    assert reasons(session) == ()
    session = record(session, agent({"type": "system", "subtype": "init"}), result())
    assert reasons(session) == ()


def test_it_clears_an_error_when_a_turn_starts_elsewhere():
    """An attached session prompted from an SDK script: the agent's init is the follow-up."""
    session = turn(new_session(), subtype="error_during_execution", is_error=True)
    session = record(session, agent({"type": "system", "subtype": "init"}))
    assert reasons(session) == ()


def test_it_flags_an_agent_that_exited_non_zero():
    session = turn(new_session())
    session = record(session, ours(Event.Source.BRIDGE, {"type": "exit", "code": 3}))
    assert session.status == AgentSession.Status.EXITED
    assert reasons(session) == ("failed",)


def test_it_leaves_a_clean_exit_and_a_requested_kill_alone():
    clean = record(turn(new_session()), ours(Event.Source.BRIDGE, {"type": "exit", "code": 0}))
    assert reasons(clean) == ()
    killed = new_session(kill_requested=True)
    killed = turn(killed, subtype="error_during_execution", is_error=True)
    killed = record(killed, ours(Event.Source.BRIDGE, {"type": "exit", "code": -9}))
    assert killed.status == AgentSession.Status.KILLED
    assert reasons(killed) == ()


def test_it_flags_a_lost_session_until_someone_continues_it():
    session = record(turn(new_session()), ours(Event.Source.BRIDGE, {"type": "lost"}))
    assert session.status == AgentSession.Status.LOST
    assert reasons(session) == ("lost",)
    session = record(session, ours(Event.Source.DASHBOARD, {"type": "continue", "session": "x"}))
    assert reasons(session) == ()


def test_it_flags_a_recorded_gap_until_the_next_follow_up():
    session = record(
        new_session(),
        ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go"}),
        ours(Event.Source.BRIDGE, {"type": "gap", "message": "evicted"}),
        result(),
    )
    assert reasons(session) == ("gap",)
    session = record(session, ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "again"}))
    assert reasons(session) == ()


def test_it_flags_a_session_idle_after_a_turn_past_the_threshold(settings):
    settings.PORTHOLE_ATTENTION_IDLE_MINUTES = 10
    session = turn(new_session())
    assert session.status == AgentSession.Status.IDLE
    assert reasons(session) == ()
    assert reasons(session, now=later()) == ("idle",)
    # Working again (a prompt arrived): not idle, whatever the clock says.
    session = record(session, ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "more"}))
    assert reasons(session, now=later()) == ()


def test_it_judges_idleness_by_the_databases_clock(settings):
    """Without an explicit `now` (the list's filter), the database's clock decides."""
    settings.PORTHOLE_ATTENTION_IDLE_MINUTES = 10
    session = turn(new_session())
    assert reasons(session) == ()
    Event.objects.filter(session=session).update(created_at=timezone.now() - timedelta(minutes=11))
    assert reasons(session) == ("idle",)


def _idle_in(session: AgentSession, now: object) -> timedelta | None:
    annotated = attention.with_attention(
        AgentSession.objects.filter(pk=session.pk),
        now=now,  # type: ignore[arg-type]
    ).get()
    return attention.idle_in(annotated, now)  # type: ignore[arg-type]


def test_it_tells_when_a_session_will_need_attention_for_sitting_idle(settings):
    """The idle rule read forwards, for the bridge to look again just then (nothing else
    happens when time passes): from the end of the turn, not from the last event."""
    settings.PORTHOLE_ATTENTION_IDLE_MINUTES = 10
    session = turn(new_session())
    ended = Event.objects.get(session=session, type="turn_complete").created_at
    session = record(session, agent({"type": "rate_limit_event"}))  # later, not a follow-up
    now = ended + timedelta(minutes=4)
    assert _idle_in(session, now) == timedelta(minutes=6)
    assert reasons(session, now=ended + timedelta(minutes=10, seconds=1)) == ("idle",)
    # Due already: nothing to wait for (it needs attention now).
    assert _idle_in(session, ended + timedelta(minutes=11)) is None
    # A follow-up: not until a turn ends again.
    session = record(session, ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "more"}))
    assert _idle_in(session, now) is None
    session = turn(session)
    second = Event.objects.filter(session=session, type="turn_complete").latest("seq").created_at
    assert _idle_in(session, second) == timedelta(minutes=10)
    session = record(session, ours(Event.Source.DASHBOARD, {"type": "acknowledged"}))
    assert _idle_in(session, second) is None  # marked as handled: a turn must end again
    # Never for a session that is not idle.
    session = record(session, ours(Event.Source.BRIDGE, {"type": "exit", "code": 0}))
    assert session.status == AgentSession.Status.EXITED
    assert _idle_in(session, second) is None


def test_it_does_not_call_a_fresh_session_idle():
    """Idle before any turn (the agent's first `ready`) is not "idle after a turn"."""
    session = record(new_session(), agent({"type": "ready"}))
    assert session.status == AgentSession.Status.IDLE
    assert reasons(session, now=later()) == ()


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's plans (EXPLAIN QUERY PLAN)")
def test_it_looks_for_an_error_by_kind_of_line_not_through_the_whole_turn():
    """A long turn (a flood) is tens of thousands of agent events: each look for the lines
    that end a turn in error goes straight to that kind of line (the index on session,
    source, type and seq), as the look for the last follow-up does."""
    session = new_session()
    annotated = attention.with_attention(AgentSession.objects.filter(pk=session.pk))
    sql, params = annotated.values("attention_error").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN QUERY PLAN " + sql, params)
        plan = [row[-1] for row in cursor.fetchall()]
    looks = [step for step in plan if step.startswith("SEARCH U")]  # the events' subqueries
    assert len(looks) >= len(attention.FOLLOW_UPS) + 2, plan
    assert all("type=?" in step for step in looks), plan


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "result", "subtype": "success", "x": NaN, "is_error": true}',
        '{"type": "result", "subtype": "error_\\u0000", "result": "\\udfff"}',
        '{"type": "result", "subtype": ' + json.dumps("é" * 200) + ', "is_error": "true"}',
    ],
)
def test_it_survives_hostile_result_lines(raw):
    """A line no database would parse as JSON must not break the rule's query."""
    session = record(
        new_session(), ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go"}), agent(raw)
    )
    assert reasons(session) in {(), ("error",)}
    assert attention.needing_attention().count() in {0, 1}


def test_it_filters_the_session_list_by_the_rule(alice):
    errored = turn(new_session(title="Errored turn", user=alice), subtype="error_during_execution")
    fine = turn(new_session(title="Fine turn", user=alice))
    killed = record(new_session(title="Killed one", kill_requested=True), result())
    record(killed, ours(Event.Source.BRIDGE, {"type": "exit", "code": -9}))
    client = Client()
    client.force_login(alice)
    html = client.get(reverse("index"), {"status": "attention"}).content.decode()
    assert errored.title in html
    assert fine.title not in html and "Killed one" not in html
    all_rows = client.get(reverse("index")).content.decode()
    assert "needs attention" in all_rows.lower()


# -- end to end: the demo agent's endings, recorded by a real bridge ----------------------------


OWNER = "attention-test"


@database_sync_to_async
def _session_for(sandbox_id: str, session_id: str) -> AgentSession:
    return AgentSession.objects.create(
        sandbox=Sandbox.objects.get_or_create(upstream_id=sandbox_id)[0],
        upstream_id=session_id,
        bridge_owner=OWNER,
        bridge_lease_until=timezone.now() + timedelta(seconds=120),
    )


@database_sync_to_async
def _reasons(session: AgentSession) -> tuple[str, ...]:
    return reasons(AgentSession.objects.get(pk=session.pk))


async def test_it_flags_the_demo_agents_failures_as_recorded(oc):
    async with OpenComputer(oc.api_url, oc.api_key) as client:
        sandbox = await client.create_sandbox()
        failing = await client.start_agent(sandbox.sandbox_id, prompt="fail out of ideas")
        exiting = await client.start_agent(sandbox.sandbox_id, prompt="working\nexit 4")
        failed_turn = await _session_for(sandbox.sandbox_id, failing.session_id)
        exited = await _session_for(sandbox.sandbox_id, exiting.session_id)

        await asyncio.wait_for(Bridge(str(exited.id), OWNER).run(), 30)
        assert await _reasons(exited) == ("failed",)

        bridge = asyncio.create_task(Bridge(str(failed_turn.id), OWNER).run())

        async def turn_over() -> bool:
            return await database_sync_to_async(
                Event.objects.filter(session=failed_turn, type="turn_complete").exists
            )()

        try:
            await wait_for(turn_over, 30)
            assert await _reasons(failed_turn) == ("error",)
        finally:
            bridge.cancel()
            await asyncio.gather(bridge, return_exceptions=True)
            await client.kill_agent(sandbox.sandbox_id, failing.session_id)
