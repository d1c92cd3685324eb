"""Full-text search over every session (issue 12): ranked, with the matching snippet marked
(and escaped), linking to the event in its session; the index maintained as events are
recorded, and rebuilt for sessions recorded before it existed. These tests run on SQLite
(FTS5) here and on PostgreSQL in the team-mode rerun of the suite."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse

from dashboard.agents.models import AgentSession
from dashboard.agents.recording import NewEvent, record
from dashboard.search.index import reindex, search
from dashboard.search.models import SearchEntry
from tests.agents.test_rendering import XSS, add_event, assert_safe, make_session, parse

pytestmark = pytest.mark.django_db


def recorded(session: AgentSession, source: str, payload: dict[str, Any]) -> int:
    raw = json.dumps(payload)
    appended, _ = record(session.id, [NewEvent.from_line(source, raw, payload)])
    return appended.events[0].seq


def assistant(text: str) -> dict[str, Any]:
    return {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}


def tool(command: str) -> dict[str, Any]:
    block = {"type": "tool_use", "id": "toolu_s", "name": "Bash", "input": {"command": command}}
    return {"type": "assistant", "message": {"content": [block]}}


def output(text: str) -> dict[str, Any]:
    block = {"type": "tool_result", "tool_use_id": "toolu_s", "content": text}
    return {"type": "user", "message": {"content": [block]}}


def test_it_indexes_events_as_they_are_recorded_and_finds_every_kind() -> None:
    session = make_session(title="Signup")
    prompt = recorded(session, "dashboard", {"type": "prompt", "text": "Validate the zebra field"})
    said = recorded(session, "agent", assistant("I will look at the giraffe module first."))
    ran = recorded(session, "agent", tool("grep -rn pelican src/"))
    out = recorded(session, "agent", output("src/birds.py:12: pelican = True"))
    final = recorded(
        session, "agent", {"type": "result", "subtype": "success", "result": "Done: okapi added"}
    )
    recorded(session, "agent", {"type": "system", "subtype": "init", "tools": ["zebra"]})

    assert SearchEntry.objects.filter(session=session).count() == 5
    for word, seq in (("zebra", prompt), ("giraffe", said), ("okapi", final)):
        hits = search(word)
        assert [(h.session.id, h.seq) for h in hits] == [(session.id, seq)], word
    assert {h.seq for h in search("pelican")} == {ran, out}


def test_it_ranks_the_better_match_first_and_marks_the_snippet() -> None:
    session = make_session()
    weak = add_event(session, "agent", assistant("a note on validators " + "filler words " * 40))
    strong = add_event(session, "agent", assistant("validators validators: the validators module"))
    reindex([session])
    hits = search("validators")
    assert [h.seq for h in hits] == [strong.seq, weak.seq]
    marked = [text for text, matched in hits[0].snippet if matched]
    assert marked and all(text.lower().startswith("validator") for text in marked)


def test_it_matches_all_words_as_prefixes_and_ignores_query_syntax() -> None:
    session = make_session()
    both = add_event(session, "agent", assistant("refactor the payment gateway"))
    add_event(session, "agent", assistant("refactor the login page"))
    reindex([session])
    assert [h.seq for h in search("refac gatew")] == [both.seq]
    for hostile in ('"', "NEAR(", "a OR b) AND", "*", "!@#$%^&*()", "'; DROP TABLE x; --", ":*"):
        search(hostile)  # never a syntax error from the engine
    assert search("   ") == []


@pytest.mark.parametrize("payload", XSS[:10])
def test_it_escapes_hostile_text_in_snippets(payload: str, alice: User) -> None:
    session = make_session(title=payload)
    add_event(session, "agent", assistant(f"needle {payload} needle"))
    reindex([session])
    client = Client()
    client.force_login(alice)
    response = client.get(reverse("search"), {"q": "needle"}, headers={"HX-Request": "true"})
    page = assert_safe(response.content.decode())
    marks = page.find("mark")
    assert marks, "the match is marked"


def test_it_links_each_hit_to_its_event_in_the_session(alice: User) -> None:
    session = make_session(title="Birds")
    add_event(session, "agent", assistant("nothing here"))
    hit = add_event(session, "agent", assistant("the flamingo is pink"))
    reindex([session])
    client = Client()
    client.force_login(alice)
    response = client.get(reverse("search"), {"q": "flamingo"})
    assert response.status_code == 200
    links = [e.attrs["href"] for e in parse(response.content.decode()).find("a", "hit-link")]
    assert links == [reverse("session", args=[session.id]) + f"?at={hit.seq}#event-{hit.seq}"]
    # The htmx request gets only the results.
    partial = client.get(reverse("search"), {"q": "flamingo"}, headers={"HX-Request": "true"})
    assert partial.content.decode().lstrip().startswith('<section id="search-results"')


def test_it_lets_only_team_members_search(bob: User, erin: User) -> None:
    anonymous = Client().get(reverse("search"), {"q": "x"})
    assert anonymous.status_code == 302
    client = Client()
    client.force_login(erin)
    assert client.get(reverse("search"), {"q": "x"}).status_code == 403
    client.force_login(bob)
    assert client.get(reverse("search"), {"q": "x"}).status_code == 200


def test_it_indexes_sessions_recorded_before_the_index_with_a_command() -> None:
    session = make_session()
    add_event(session, "agent", assistant("an old armadillo"))
    assert search("armadillo") == []
    call_command("reindex_search", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert [h.seq for h in search("armadillo")] == [1]
    call_command("reindex_search", str(session.id), stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert SearchEntry.objects.filter(session=session).count() == 1


def test_it_forgets_a_deleted_session() -> None:
    session = make_session()
    recorded(session, "agent", assistant("ephemeral wombat"))
    assert search("wombat")
    session.delete()
    assert search("wombat") == []


def test_it_never_stops_recording_when_indexing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's write fails in the database (on PostgreSQL that aborts whatever
    transaction it is in, unless the index has its own savepoint): the events are stored
    all the same, with their elements, and the session's row moves on."""
    from dashboard.search import index

    def refused(*args: Any, **kwargs: Any) -> None:
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO search_searchentry (no_such_column) VALUES (1)")

    monkeypatch.setattr(index, "insert_many", refused)
    session = make_session()
    seq = recorded(session, "agent", assistant("still recorded"))
    event = session.events.get(seq=seq)
    assert event.html and "still recorded" in event.html
    assert not SearchEntry.objects.filter(session=session).exists()
    session.refresh_from_db()
    assert session.next_seq == seq + 1


def test_it_keeps_markers_nuls_and_secrets_out_of_the_index(settings: Any) -> None:
    session = make_session()
    recorded(session, "agent", assistant("mark\x01er \x02 nul\x00 lone \ud800 surrogate"))
    (entry,) = SearchEntry.objects.filter(session=session)
    assert "\x01" not in entry.text and "\x02" not in entry.text and "\x00" not in entry.text
    assert search("surrogate")


def test_it_uses_the_engine_of_the_database() -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("SELECT count(*) FROM sqlite_master WHERE name = 'search_fts'")
        else:
            cursor.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'search_entry_fts'")
        assert cursor.fetchone()[0] == 1


def test_it_lets_the_gil_go_while_indexing_or_rendering_a_large_batch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Work on a bridge's threads (rendering a batch, indexing hundreds of events) would
    otherwise keep the event loop waiting for the GIL up to the switch interval each time."""
    from dashboard import gil
    from dashboard.search.index import index_events

    handed: list[float] = []
    monkeypatch.setattr(gil, "EVERY", 0.0)
    monkeypatch.setattr(gil.time, "sleep", handed.append)
    session = make_session()
    appended, _ = record(
        session.id,
        [NewEvent.from_line("agent", json.dumps(p), p) for p in map(assistant, "abcdef")],
        index=False,
    )
    rendering = len(handed)
    assert rendering >= 5 and set(handed) == {0}
    index_events(appended.events)
    assert len(handed) - rendering >= 5
    assert SearchEntry.objects.filter(session=session).count() == 6


@pytest.mark.django_db(transaction=True)
def test_it_commits_the_index_without_waiting_for_the_disk_but_no_one_elses_work() -> None:
    """On PostgreSQL the index's own transaction commits asynchronously (it is derived and
    rebuilt after a crash); a record's commit, or a caller's transaction that indexes, still
    waits for the disk."""
    if connection.vendor != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    from django.db import transaction
    from django.test.utils import CaptureQueriesContext

    from dashboard.search.index import index_events

    def said(text: str) -> NewEvent:
        payload = assistant(text)
        return NewEvent.from_line("agent", json.dumps(payload), payload)

    def synchronous_commit() -> str:
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            return str(cursor.fetchone()[0])

    session = make_session()
    with connection.cursor() as cursor:  # the team-mode run connects with it off, for speed
        cursor.execute("SET synchronous_commit = on")
    try:
        with CaptureQueriesContext(connection) as recording:
            appended, _ = record(session.id, [said("durable first")], index=False)
        with CaptureQueriesContext(connection) as indexing:
            index_events(appended.events)
        assert not any("synchronous_commit" in query["sql"] for query in recording)
        assert any("'synchronous_commit', 'off', true" in query["sql"] for query in indexing)
        assert synchronous_commit() == "on"  # for that transaction only
        with transaction.atomic():
            text = "then indexed in a caller's transaction"
            more, _ = record(session.id, [said(text)], index=False)
            index_events(more.events)
            assert synchronous_commit() == "on"
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")
    assert [hit.seq for hit in search("durable")] == [appended.events[0].seq]
