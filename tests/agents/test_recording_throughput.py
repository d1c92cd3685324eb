"""What makes recording a flood cheap (issue 11), as mechanisms rather than timings: the
bridge keeps one database connection across its batches, a batch formats its time once,
plain text skips the markdown parser yet reads the same, rows go in with one statement per
batch, and a page load reuses the fragment stored with each event instead of rendering the
event a second time."""

from __future__ import annotations

import asyncio
import functools
import html
import json
import random
import threading
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext
from channels.db import database_sync_to_async
from django.conf import settings as django_settings
from django.db import DataError, connection, connections, transaction
from django.db.backends.signals import connection_created
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import formats, timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.agents import bridge
from dashboard.agents.bridge import STORE_SLICE, Bridge, on_bridge_thread
from dashboard.agents.leases import LEASE_SECONDS, Lease
from dashboard.agents.markdown import render_markdown
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.recording import NewEvent, draw_stored, record, store
from dashboard.agents.rendering import ToolIndex, render, render_event, render_event_oob
from dashboard.agents.rendering.agent import plain_paragraphs
from dashboard.agents.rendering.items import TextBlock, _stamp, stamp
from dashboard.agents.rendering.templates import render as render_macro
from dashboard.agents.sqlwrite import COPY_FROM, db_value, insert_many
from dashboard.opencomputer import OpenComputer
from dashboard.search.models import SearchEntry
from tests.agents.helpers import held_session

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

OWNER = "throughput-worker"


_new_session = functools.partial(held_session, owner=OWNER, lease_seconds=60)


@database_sync_to_async
def _created_at_count(session: AgentSession) -> tuple[int, int]:
    """(events, distinct transactions): each batch stamps its events with one time."""
    rows = Event.objects.filter(session=session)
    return rows.count(), rows.values("created_at").distinct().count()


def pool_in_use() -> bool:
    return bool(django_settings.DATABASES["default"].get("OPTIONS", {}).get("pool"))


@database_sync_to_async
def _backend_pids() -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        return {row[0] for row in cursor.fetchall()}


async def test_it_keeps_one_database_connection_across_a_floods_batches(oc):
    """One connection for the bridge's life; with PostgreSQL's pool, borrowed for each
    batch: then what counts is how many PostgreSQL itself opened meanwhile (backend pids it
    had not seen before the flood): none or a few as the pool grows, never one per batch."""
    client = OpenComputer(oc.api_url, oc.api_key)
    sandbox = await client.create_sandbox()
    agent = await client.start_agent(sandbox.sandbox_id, prompt="flood 3000 100\nexit 0")
    session = await _new_session(sandbox.sandbox_id, agent.session_id)
    opened: list[Any] = []

    def count(**kwargs: Any) -> None:
        wrapper = kwargs["connection"]
        pooled = wrapper.settings_dict.get("OPTIONS", {}).get("pool")
        opened.append(
            wrapper.connection.info.backend_pid if pooled else (threading.get_ident(), wrapper)
        )

    existing = await _backend_pids() if pool_in_use() else set()
    connection_created.connect(count, weak=False)
    try:
        await asyncio.wait_for(Bridge(str(session.id), OWNER).run(), 60)
    finally:
        connection_created.disconnect(count)
        await client.aclose()
    events, batches = await _created_at_count(session)
    assert events >= 3000
    # Stored in slices of at most `STORE_SLICE` when it falls behind, drawn in more.
    assert batches >= 3000 // STORE_SLICE, "the flood should have been stored in many batches"
    if pool_in_use():
        new = set(opened) - existing
        assert len(new) <= 2, f"{len(new)} connections opened for {batches} batches"
    else:
        # The bridge's thread's, and the search index thread's unless an earlier bridge of
        # this process opened that one already: one each, never one per batch.
        threads = [thread for thread, _ in opened]
        assert len(opened) <= 2 and len(set(threads)) == len(threads), (
            f"{len(opened)} connections for {batches} batches"
        )


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite cannot tell a closed handle (is_usable)"
)
async def test_it_replaces_a_kept_connection_that_died_while_idle(monkeypatch):
    monkeypatch.setattr(bridge, "IDLE_CHECK_SECONDS", 0.0)

    def drop_underneath() -> None:
        connection.ensure_connection()
        assert connection.connection is not None
        connection.connection.close()  # as a server restart or an idle timeout would

    async with ThreadSensitiveContext():
        count = on_bridge_thread(Event.objects.count)
        await count()
        await on_bridge_thread(drop_underneath)()
        assert await count() == 0
        await on_bridge_thread(connections.close_all)()


def _autocheckpoint() -> int:
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA wal_autocheckpoint")
        return int(cursor.fetchone()[0])


@pytest.mark.skipif(connection.vendor != "sqlite", reason="a SQLite connection's own setting")
async def test_it_leaves_checkpoints_of_the_write_ahead_log_to_the_other_connections():
    """A bridge's commit never stops to copy the log into the database: its connection is
    told not to, however often it is opened again; the process's other connections are not."""
    async with ThreadSensitiveContext():
        assert await on_bridge_thread(_autocheckpoint)() == 0
        await on_bridge_thread(connections.close_all)()
        assert await on_bridge_thread(_autocheckpoint)() == 0
        await on_bridge_thread(connections.close_all)()
    assert await database_sync_to_async(_autocheckpoint)() > 0


@pytest.mark.skipif(not pool_in_use(), reason="PostgreSQL's connection pool is not in use")
async def test_it_hands_a_pooled_connection_back_after_each_bridge_call():
    """A bridge holding a pooled connection for its life would drain the pool (20 live
    sessions, 20 connections): it borrows one per call."""

    def held() -> object:
        return connection.connection

    async with ThreadSensitiveContext():
        assert await on_bridge_thread(Event.objects.count)() == 0
        assert await on_bridge_thread(held)() is None


# -- rendering ---------------------------------------------------------------------------


def _session() -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id="sb-throughput")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-throughput")


def _agent(data: dict[str, Any]) -> NewEvent:
    return NewEvent.from_line(Event.Source.AGENT, json.dumps(data), data)


def _text(text: str, **extra: Any) -> NewEvent:
    message = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    return _agent({"type": "assistant", "message": message, **extra})


def test_it_formats_and_draws_the_time_of_paced_events_once_a_second():
    """A paced session stores each event at a time of its own: the page shows them to the
    second, and they share that second's formatting and `<time>` element."""
    _stamp.cache_clear()
    moment = timezone.now().replace(microsecond=1)
    first, later = stamp(moment), stamp(moment.replace(microsecond=999_999))
    assert later is first
    assert first.html is later.html
    assert "." not in first.iso  # to the second, as shown
    assert stamp(moment + timedelta(seconds=1)) is not first


def test_it_formats_a_batchs_time_once(monkeypatch):
    calls: list[str] = []
    date_format, time_format = formats.date_format, formats.time_format

    def counted(real: Any) -> Any:
        def call(value: Any, format: str) -> str:
            calls.append(format)
            return str(real(value, format))

        return call

    monkeypatch.setattr(formats, "date_format", counted(date_format))
    monkeypatch.setattr(formats, "time_format", counted(time_format))
    _stamp.cache_clear()
    appended, messages = record(_session().id, [_text(f"line {n}") for n in range(50)])
    assert len(messages[0][1]["items"]) == 50
    assert sorted(calls) == ["H:i:s", "Y-m-d H:i:s T", "c"], calls
    shown = timezone.localtime(appended.events[0].created_at).strftime("%H:%M:%S")
    assert all(f">{shown}</time>" in oob for _, oob in messages[0][1]["items"])


PLAIN_POOL = list("abcXYZéß ") * 6 + list("1 .,;:?'\"/()%@$=+-#\n\n")
HOSTILE_POOL = list("aZé1 .,;:?'\"/()%@$=+-#\n\n\u00a0\t\u2014*_`[]<>&!~|\\") + [
    "1. ",
    "- ",
    "> ",
    "    ",
    "  \n",
    "===",
    "---",
    "http://x.y ",
]


def test_it_renders_plain_text_as_markdown_would_without_the_parser():
    rng = random.Random(11)
    fast = 0
    for attempt in range(6000):
        pool = PLAIN_POOL if attempt % 2 else HOSTILE_POOL
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 60)))
        paragraphs = plain_paragraphs(text)
        if paragraphs is None:
            continue
        fast += 1
        fast_block = TextBlock(html="", paragraphs=paragraphs)
        ours = render_macro("block_text", block=fast_block, item=None)
        theirs = render_macro("block_text", block=TextBlock(html=render_markdown(text)), item=None)
        # The same document: the template escapes quotes that markdown-it leaves as they are.
        assert html.unescape(ours) == html.unescape(theirs.replace("&nbsp;", "\u00a0")), text
    assert fast > 1000


@pytest.mark.parametrize(
    "text",
    [
        "**bold**",
        "1. first",
        "- item",
        "    code",
        "a  \nb",
        "a <b>",
        "see `x`",
        "# Title",
        "x\n===",
    ],
)
def test_it_leaves_anything_markdown_would_shape_to_the_parser(text):
    assert plain_paragraphs(text) is None


def _recorded_mix(alice: Any) -> AgentSession:
    session = _session()
    call = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a\nb"}
    events = [
        _agent({"type": "ready"}),
        _text("Plain words to begin with"),
        _text("Some **markdown** and `code`"),
        _agent({"type": "assistant", "message": {"content": [call]}}),
        _agent({"type": "user", "message": {"content": [result]}}),
        _agent({"type": "stream_event", "event": {"type": "ping"}}),
        _agent({"type": "stream_event", "event": {"type": "ping"}}),
        _text("Inside a task", parent_tool_use_id="toolu_1"),
        NewEvent.from_line(Event.Source.STDERR, "a log line", None),
        NewEvent.ours(Event.Source.DASHBOARD, {"type": "prompt", "text": "go"}, actor_id=alice.pk),
        _agent({"type": "result", "subtype": "success", "result": "done", "num_turns": 1}),
        _agent({"type": "turn_complete", "claude_session_id": "c1"}),
    ]
    record(session.id, events)
    return session


def _page(session: AgentSession, events: list[Event]) -> list[str]:
    for event in events:
        event.session = session
    tools = ToolIndex.for_session(session, events)
    return [render_event(event, tools) for event in events]


def test_it_keeps_the_element_of_events_that_stand_alone(alice):
    session = _recorded_mix(alice)
    kept = dict(Event.objects.filter(session=session).values_list("seq", "html"))
    standing = {seq for seq, html in kept.items() if html}
    # ready, the two texts, stderr, result, turn_complete: drawn the same on any page.
    assert standing == {1, 2, 3, 9, 11, 12}, kept
    assert kept[2] is not None and 'id="event-2"' in kept[2] and "Plain words" in kept[2]


def test_it_writes_each_event_once_with_its_element_in_one_transaction(alice):
    """The batch is rendered inside the transaction that stores it, once its seqs are known,
    so each element goes in with its row: no second write of the rows (an UPDATE of each
    one, in a transaction of its own, before), and the lease is checked and extended with
    the two statements that read and update the session's row anyway. As a bridge records
    (`index=False`), nothing in it is for the search index."""
    session = _session()
    session.bridge_owner, session.bridge_lease_until = OWNER, timezone.now() + timedelta(seconds=2)
    session.save()
    lease = Lease(str(session.id), OWNER, None)
    events = [_text(f"text {n}") for n in range(20)]
    with CaptureQueriesContext(connection) as queries:
        appended, _ = record(session.id, events, lease=lease, index=False)
    statements = [query["sql"] for query in queries.captured_queries]
    assert not [sql for sql in statements if "search" in sql or "SAVEPOINT" in sql], statements
    # On PostgreSQL the waits are bounded by the statement that locks the row.
    assert not [sql for sql in statements if sql.startswith("SELECT set_config")], statements
    on_events = [sql for sql in statements if '"agents_event"' in sql]
    # One statement: the INSERT run for every row or, on PostgreSQL, one COPY.
    assert len(on_events) == 1, on_events
    assert on_events[0].startswith(("20 times: INSERT", "COPY")), on_events
    assert sum(sql.startswith("COMMIT") for sql in statements) <= 1, statements
    on_session = [sql for sql in statements if '"agents_agentsession"' in sql]
    assert len(on_session) == 2, on_session
    stored = dict(Event.objects.filter(session=session).values_list("seq", "html"))
    assert all(
        stored[event.seq] and f'id="event-{event.seq}"' in stored[event.seq]
        for event in appended.events
    )
    held = AgentSession.objects.get(id=session.id).bridge_lease_until
    assert held is not None and held > timezone.now() + timedelta(seconds=LEASE_SECONDS - 5)


def test_it_indexes_events_in_a_transaction_after_the_one_that_stores_them() -> None:
    """What the search index takes (extracting text, its INSERT, on PostgreSQL a GIN entry,
    and a savepoint) is neither inside the storing transaction, where it held the row lock
    and could undo the batch, nor, for a bridge, in what a viewer waits for."""
    session = _session()
    with CaptureQueriesContext(connection) as queries:
        appended, _ = record(session.id, [_text("a findable aardvark")])
    statements = [query["sql"] for query in queries.captured_queries]
    stored_at = next(i for i, sql in enumerate(statements) if '"agents_event"' in sql)
    indexed_at = next(i for i, sql in enumerate(statements) if '"search_searchentry"' in sql)
    assert "COMMIT" in statements[stored_at:indexed_at], statements
    assert SearchEntry.objects.filter(session=session, seq=appended.events[0].seq).exists()


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(max_size=120), min_size=1, max_size=2 * COPY_FROM))
def test_it_stores_any_text_exactly_however_many_rows_a_batch_holds(texts: list[str]) -> None:
    """Batches under `COPY_FROM` rows go in as INSERTs, larger ones (on PostgreSQL) as one
    COPY, whose text format escapes tabs, newlines, backslashes and `\\N` itself: either
    way what is read back is what was stored, byte for byte."""
    sandbox = Sandbox.objects.create(upstream_id=f"sb-text-{Sandbox.objects.count()}")
    session = AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-text")
    events = [NewEvent.from_line(Event.Source.STDERR, text, None) for text in texts]
    appended, _ = record(session.id, events)
    stored = list(Event.objects.filter(session=session).order_by("seq").values_list("raw", "html"))
    assert [raw for raw, _ in stored] == [event.raw for event in events]
    assert all(
        html and f'id="event-{event.seq}"' in html
        for (_, html), event in zip(stored, appended.events, strict=True)
    )


@pytest.mark.parametrize("count", [1, 3, COPY_FROM - 1])
def test_it_inserts_a_few_rows_at_once_past_those_already_there(count: int) -> None:
    """The search index writes what it may have written before (`ignore_conflicts`): the
    rows already there are kept as they were, the others go in."""
    session = _session()
    prepared = db_value(SearchEntry, "session", session.id)
    now = db_value(SearchEntry, "created_at", timezone.now())
    columns = ["session", "seq", "kind", "text", "created_at"]
    insert_many(SearchEntry, columns, [(prepared, 1, "prompt", "kept", now)])
    rows = [(prepared, seq, "assistant", f"new {seq}", now) for seq in range(1, count + 2)]
    insert_many(SearchEntry, columns, rows, ignore_conflicts=True)
    texts = (
        SearchEntry.objects.filter(session=session).order_by("seq").values_list("text", flat=True)
    )
    assert list(texts) == ["kept", *[f"new {seq}" for seq in range(2, count + 2)]]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite keeps a NUL")
@pytest.mark.parametrize("count", [2, COPY_FROM])
def test_it_raises_djangos_error_for_content_the_database_refuses(count: int) -> None:
    """A batch whose content the database refuses is stored line by line
    (`recording._append_isolating`), which it tells by Django's `DataError`: COPY's too."""
    session = _session()
    prepared = db_value(SearchEntry, "session", session.id)
    now = db_value(SearchEntry, "created_at", timezone.now())
    rows = [(prepared, seq, "assistant", "nul \x00 here", now) for seq in range(1, count + 1)]
    with pytest.raises(DataError), transaction.atomic():
        insert_many(SearchEntry, ["session", "seq", "kind", "text", "created_at"], rows)


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(max_size=120), min_size=1, max_size=2 * COPY_FROM))
def test_it_keeps_any_element_drawn_after_storing_exactly(texts: list[str]) -> None:
    """A bridge that fell behind writes elements to stored rows afterwards (`update_many`:
    on PostgreSQL the values go as arrays): what is read back is what was drawn, and the
    session's other rows are untouched."""
    sandbox = Sandbox.objects.create(upstream_id=f"sb-drawn-{Sandbox.objects.count()}")
    session = AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-drawn")
    other = AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-other")
    record(other.id, [NewEvent.from_line(Event.Source.STDERR, "untouched", None)])
    before = list(Event.objects.filter(session=other).values_list("html", flat=True))
    events = [NewEvent.from_line(Event.Source.STDERR, text, None) for text in texts]
    store(session.id, events)
    assert set(Event.objects.filter(session=session).values_list("html", flat=True)) == {None}

    drawn = draw_stored(session.id, 1, len(events), {}, ToolIndex())

    stored = list(Event.objects.filter(session=session).order_by("seq").values_list("raw", "html"))
    assert [html for _, html in stored] == [row.html for row in drawn.rows]
    assert all(html and f'id="event-{seq}"' in html for seq, (_, html) in enumerate(stored, 1))
    assert list(Event.objects.filter(session=other).values_list("html", flat=True)) == before
    assert AgentSession.objects.get(id=session.id).undrawn_from is None


def test_it_serves_a_page_from_kept_elements_as_it_would_render_them(alice, monkeypatch):
    session = _recorded_mix(alice)
    events = list(Event.objects.filter(session=session).select_related("actor").order_by("seq"))
    fresh = _page(session, [_without_html(event) for event in events])
    described: list[int] = []
    real = render.describe

    def counted(event: Event, tools: ToolIndex) -> Any:
        described.append(event.seq)
        return real(event, tools)

    monkeypatch.setattr(render, "describe", counted)
    assert _page(session, events) == fresh
    assert not {1, 2, 3, 9, 11, 12} & set(described), described


def test_it_draws_kept_elements_as_html_on_the_page_not_as_text(alice):
    """Read back from the database a kept element is a plain string: the page's template
    must not escape it (it did: the timeline showed the markup as text)."""
    session = _recorded_mix(alice)
    client = Client()
    client.force_login(alice)
    page = client.get(reverse("session", args=[session.id])).content.decode()
    assert '<article id="event-2"' in page and "Plain words" in page
    assert "&lt;article" not in page and "&lt;div" not in page


def test_it_catches_a_viewer_up_with_kept_elements_as_they_were_sent(alice):
    session = _session()
    sent = dict(record(session.id, [_text(f"text {n}") for n in range(5)])[1][0][1]["items"])
    events = list(Event.objects.filter(session=session).order_by("seq"))
    assert all(event.html for event in events)
    tools = ToolIndex.for_session(session, events)
    for event in events:
        event.session = session
        assert render_event_oob(event, tools) == sent[event.seq]


def _without_html(event: Event) -> Event:
    copy = Event.objects.select_related("actor").get(pk=event.pk)
    copy.html = None
    return copy
