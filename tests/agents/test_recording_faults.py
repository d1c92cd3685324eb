"""No line a sandbox prints can stop recording (DESIGN invariant 7), on every backend.

Each hostile line is recorded through the same path the bridge uses; afterwards the session
must still take the next event, and every page-facing read of the row must work.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.recording import NewEvent, record
from dashboard.agents.rendering import ToolIndex
from dashboard.opencomputer import JSONLineAssembler, OpenComputer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

OWNER = "faults-worker"

POISON_RESULTS = [
    {"type": "result", "subtype": "success", "total_cost_usd": 1e20, "num_turns": 1},
    {"type": "result", "subtype": "success", "num_turns": 1e300},
    {"type": "result", "subtype": "success", "duration_ms": 2**70, "num_turns": 2**40},
    {"type": "result", "usage": {"input_tokens": 2**64, "output_tokens": -(2**70)}},
    {"type": "result", "total_cost_usd": "1e999", "num_turns": "12"},
    {"type": "result", "total_cost_usd": -5, "duration_ms": 1.5},
]
POISON_LINES = [
    *(json.dumps(obj) for obj in POISON_RESULTS),
    '{"type":"result","total_cost_usd":NaN,"num_turns":Infinity,"duration_ms":-Infinity}',
    '{"type":"system","subtype":"init","model":"m\\u0000x","session_id":"\\udfff\\u0000"}',
    '{"type":"assistant\\u0000","subtype":"\\ud800","message":{"content":[]}}',
    '{"type":"' + "t" * 500 + '"}',
    "plain text with a NUL \x00 in it",
    '{"type":"assistant","text":"raw NUL \x00 inside"}',
]


def _session() -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=f"sb-{Sandbox.objects.count()}")
    return AgentSession.objects.create(
        sandbox=sandbox,
        upstream_id="s-1",
        bridge_owner=OWNER,
        bridge_lease_until=timezone.now() + timedelta(seconds=60),
    )


def _from_line(raw: str, source: str = Event.Source.AGENT) -> NewEvent:
    lines = JSONLineAssembler().feed(raw.encode("utf-8", "surrogatepass") + b"\n")
    assert len(lines) == 1
    return NewEvent.from_line(source, lines[0].text, lines[0].data)


def _read_back(session: AgentSession) -> None:
    """What every page does with the row and its events: none of it may raise."""
    fresh = AgentSession.objects.get(id=session.id)
    assert fresh.total_cost_usd >= 0
    assert str(fresh.total_cost_usd)
    for event in Event.objects.filter(session=session):
        assert isinstance(event.raw, str)
        event.data  # noqa: B018 - parsing must not raise


@pytest.mark.parametrize("line", POISON_LINES)
def test_it_records_a_poison_line_and_the_next_one(line: str) -> None:
    session = _session()
    record(session.id, [_from_line(line)], lease_owner=OWNER)
    record(session.id, [_from_line('{"type":"ready"}')], lease_owner=OWNER)
    _read_back(session)
    kinds = list(Event.objects.filter(session=session).values_list("type", flat=True))
    assert kinds[-1] == "ready"
    assert len(kinds) == 2


def test_it_records_poison_on_stderr_too() -> None:
    session = _session()
    record(session.id, [_from_line("log \x00 line", Event.Source.STDERR)], lease_owner=OWNER)
    _read_back(session)
    assert Event.objects.filter(session=session, source=Event.Source.STDERR).count() == 1


def test_it_keeps_invalid_utf8_as_replacement_characters() -> None:
    session = _session()
    lines = JSONLineAssembler().feed(b'{"type":"x","t":"\xff\xfe\xc3"}\n\xed\xa0\x80\n')
    events = [NewEvent.from_line(Event.Source.AGENT, ln.text, ln.data) for ln in lines]
    record(session.id, events, lease_owner=OWNER)
    _read_back(session)
    assert Event.objects.filter(session=session).count() == 2


def test_it_bounds_totals_that_overflow_the_columns() -> None:
    session = _session()
    for line in POISON_LINES[:5]:
        for _ in range(3):
            record(session.id, [_from_line(line)], lease_owner=OWNER)
    fresh = AgentSession.objects.get(id=session.id)
    assert fresh.total_cost_usd < 10**6
    assert 0 <= fresh.num_turns < 2**31
    assert 0 <= fresh.duration_ms < 2**63
    assert 0 <= fresh.input_tokens < 2**63


def test_it_quarantines_a_line_the_database_still_refuses(monkeypatch) -> None:
    """Whatever slips past the bounds: the batch is split, the bad line kept raw, the rest
    stored in order."""
    from dashboard.agents import recording

    real = recording.apply_to_session

    def explode_on_marker(session: AgentSession, event: NewEvent) -> None:
        if event.type == "result" and "EXPLODE" in event.raw:
            raise ValueError("boom from a test")
        real(session, event)

    monkeypatch.setattr(recording, "apply_to_session", explode_on_marker)
    session = _session()
    events = [_from_line(f'{{"type":"n","i":{i}}}') for i in range(3)]
    events.insert(1, _from_line('{"type":"result","EXPLODE":1}'))
    record(session.id, events, lease_owner=OWNER)
    rows = list(Event.objects.filter(session=session).order_by("seq"))
    assert [r.type for r in rows] == ["n", "quarantined", "n", "n"]
    assert rows[1].source == Event.Source.BRIDGE
    assert rows[1].data is not None
    assert "boom from a test" in rows[1].data["reason"]
    assert "EXPLODE" in rows[1].data["raw"]


def test_it_forgets_what_it_learned_from_a_batch_that_was_rolled_back(monkeypatch) -> None:
    """A batch is rendered inside the transaction that stores it, so the bridge's tool index
    has seen its calls before the insert fails. A call whose line ends up quarantined was
    never stored: its result must not be drawn into a card that no page has."""
    from dashboard.agents import recording

    real = recording._insert

    def refuse_marked(rows: list[Event]) -> None:
        if any("EXPLODE" in row.raw and row.source == Event.Source.AGENT for row in rows):
            raise ValueError("refused by a test")
        real(rows)

    monkeypatch.setattr(recording, "_insert", refuse_marked)
    session = _session()
    tools = ToolIndex()
    call = {"type": "tool_use", "id": "toolu_gone", "name": "Bash", "input": {"command": "ls"}}
    lines = [
        '{"type":"n"}',
        json.dumps({"type": "assistant", "EXPLODE": 1, "message": {"content": [call]}}),
    ]
    record(session.id, [_from_line(line) for line in lines], tools=tools, lease_owner=OWNER)
    kinds = list(
        Event.objects.filter(session=session).order_by("seq").values_list("type", flat=True)
    )
    assert kinds == ["n", "quarantined"]
    assert tools.get("toolu_gone") is None
    result = {"type": "tool_result", "tool_use_id": "toolu_gone", "content": "files"}
    line = json.dumps({"type": "user", "message": {"content": [result]}})
    _, messages = record(session.id, [_from_line(line)], tools=tools, lease_owner=OWNER)
    ((seq, oob),) = messages[0][1]["items"]
    assert "toolcall-toolu_gone" not in oob and "files" in oob


def test_it_stores_an_event_whose_element_no_database_takes(monkeypatch) -> None:
    """The element goes in with the row now: one that a database refuses (a NUL on
    PostgreSQL) must cost only the kept element, never the event (quarantined) or the batch."""
    from dashboard.agents import recording

    real = recording.render_event_live

    def with_nul(event: Event, tools: ToolIndex) -> Any:
        fragment = real(event, tools)
        if fragment.article is not None and "poisoned" in event.raw:
            fragment.article += "\x00\udfff"
        return fragment

    monkeypatch.setattr(recording, "render_event_live", with_nul)
    session = _session()
    lines = ['{"type":"ready"}', '{"type":"turn_complete","note":"poisoned"}', '{"type":"ready"}']
    record(session.id, [_from_line(line) for line in lines], lease_owner=OWNER)
    rows = list(Event.objects.filter(session=session).order_by("seq"))
    assert [row.type for row in rows] == ["ready", "turn_complete", "ready"]
    assert rows[1].html is None and rows[0].html and rows[2].html


async def test_it_keeps_recording_after_poison_printed_inside_the_sandbox(oc) -> None:
    """The observation of issue 7: a command writes a poison `result` straight to the
    agent's stdout; recording must reach the exit."""
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    poison = json.dumps(POISON_RESULTS[0]) + "\\n"
    nul = "printf 'nul \\000 here\\n' > /proc/$PPID/fd/1; printf 'err \\000\\n' >&2"
    script = f"$ printf '{poison}' > /proc/$PPID/fd/1\n$ {nul}\nafter the poison\nexit 4"
    agent = await client.start_agent(sandbox.sandbox_id, prompt=script)

    @database_sync_to_async
    def make() -> AgentSession:
        sb = Sandbox.objects.create(upstream_id=sandbox.sandbox_id)
        return AgentSession.objects.create(
            sandbox=sb,
            upstream_id=agent.session_id,
            bridge_owner=OWNER,
            bridge_lease_until=timezone.now() + timedelta(seconds=60),
        )

    session = await make()
    await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 60)
    fresh = await AgentSession.objects.aget(id=session.id)
    assert fresh.status == AgentSession.Status.EXITED
    assert fresh.exit_code == 4
    assert fresh.total_cost_usd < 10**6
    await database_sync_to_async(_read_back)(session)
    await client.aclose()
