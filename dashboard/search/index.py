"""One interface to full-text search over every session, two engines behind it: SQLite's
FTS5 on one machine, PostgreSQL's text search in team mode (chosen by the connection's
vendor). Both rank, both return a snippet with the matches marked, and the marks become
<mark> elements only in a template (the text itself is always escaped).

`index_events` is called by the recorder for every batch it stores; it never raises (a
search index must not stop recording). `reindex` rebuilds sessions recorded before the
index existed (`manage.py reindex_search`).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.db.models.functions import Length
from django.urls import reverse

from dashboard.agents.models import AgentSession, Event, SessionId
from dashboard.agents.sqlwrite import commit_without_waiting_for_the_disk, db_value, insert_many
from dashboard.gil import HandOver
from dashboard.search.extract import FINDABLE, PARSE_MAX, extract
from dashboard.search.models import SearchEntry

log = logging.getLogger(__name__)

START, STOP = "\x01", "\x02"  # snippet markers; extract() keeps them out of indexed text
MAX_QUERY = 200
MAX_TERMS = 12
_WORD = re.compile(r"\w+", re.UNICODE)


# -- indexing ------------------------------------------------------------------------------


def _write(events: Iterable[Event]) -> int:
    """Index `events` (under a savepoint); returns the entries written."""

    @functools.cache
    def prepared(name: str, value: Any) -> Any:  # a batch shares its session and time
        return db_value(SearchEntry, name, value)

    rows = []
    # A bridge's index thread takes hundreds of events at once: the event loop must not
    # wait for the GIL meanwhile (its next event's p99 went 5-7 ms to 9-12).
    hand_over = HandOver()
    for event in events:
        hand_over()
        found = extract(event.source, event.type, event.raw, event.data)
        if found is not None:
            kind, text = found
            session = prepared("session", event.session_id)
            rows.append((session, event.seq, kind, text, prepared("created_at", event.created_at)))
    if rows:
        own_transaction = not connection.in_atomic_block
        with transaction.atomic():
            if own_transaction:
                # Its flush beside a record's made the next event wait (one viewer's p99,
                # paced: medians of five runs, 11.3 ms against 9.6). After a crash the next
                # bridge indexes the tail again (`index_tail`).
                commit_without_waiting_for_the_disk()
            columns = ["session", "seq", "kind", "text", "created_at"]
            insert_many(SearchEntry, columns, rows, ignore_conflicts=True)
    return len(rows)


def index_events(events: Sequence[Event]) -> None:
    """Add freshly recorded events to the index, in a transaction of its own (or under a
    savepoint inside a caller's). Never raises: a failure here undoes nothing else."""
    if not events:
        return
    try:
        _write(events)
    except Exception:
        log.exception("search: could not index %d events", len(events))


def index_tail(session_id: SessionId, span: int) -> int:
    """Index what a bridge that stopped abruptly may have left out: those of the session's
    last `span` events it drew that have no entry (a bridge holds no more back:
    `IndexFeed`). Not merely those after the last entry: a person's action is indexed as it
    is recorded, and may have come after what the stopped bridge held back. What it stored
    and did not draw is indexed as it is drawn, by the next bridge or
    `recording.draw_the_rest`. Returns the entries written. Never raises, like
    `index_events`."""
    try:
        session = AgentSession.objects.filter(id=session_id)
        row = session.values_list("next_seq", "undrawn_from").first()
        next_seq, undrawn_from = row if row is not None else (1, None)
        through = (undrawn_from or next_seq) - 1
        return _write_after(session_id, through - span, through=through, unindexed=True)
    except Exception:
        log.exception("search: could not index the tail of session %s", session_id)
        return 0


def _findable() -> Q:
    """Events `extract` may find something in: most of a session (stream events, system
    lines, Porthole's own) never has an entry, and need not be read and parsed again."""
    kinds = Q()
    for source, types in FINDABLE.items():
        kinds |= Q(source=source, type__in=types)
    # Not JSON (`extract` parses no further): a line's length is read only for these.
    too_long_to_parse = Q(source="agent", type="") & Q(raw_length__gt=PARSE_MAX)
    return kinds | too_long_to_parse


def _write_after(
    session_id: SessionId,
    seq: int,
    chunk: int = 500,
    through: int | None = None,
    *,
    unindexed: bool = False,
) -> int:
    """Index the session's events after `seq` (up to `through`; only those without an
    entry, `unindexed`), `chunk` at a time (its lines may be large)."""
    written = 0
    while True:
        after = Event.objects.filter(session__id=session_id, seq__gt=seq)
        if through is not None:
            after = after.filter(seq__lte=through)
        if unindexed:
            after = after.alias(raw_length=Length("raw"))
            entry = SearchEntry.objects.filter(session__id=session_id, seq=OuterRef("seq"))
            after = after.filter(_findable()).exclude(Exists(entry))
        events = list(after.order_by("seq")[:chunk])
        if not events:
            return written
        written += _write(events)
        seq = events[-1].seq


def reindex(sessions: Iterable[AgentSession] | None = None, chunk: int = 500) -> int:
    """Rebuild the index of `sessions` (all by default); returns the entries written."""
    written = 0
    targets = sessions if sessions is not None else AgentSession.objects.order_by("started_at")
    for session in targets:
        with transaction.atomic():
            SearchEntry.objects.filter(session=session).delete()
            written += _write_after(session.id, 0, chunk)
    return written


# -- searching -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    session: AgentSession
    seq: int
    kind: str
    created_at: datetime
    snippet: list[tuple[str, bool]]  # (text, matched) pieces, escaped by the template

    @property
    def url(self) -> str:
        # Opened at the hit's window (one request however long the session), then scrolled to.
        return reverse("session", args=[self.session.id]) + f"?at={self.seq}#event-{self.seq}"


def terms(query: str) -> list[str]:
    return _WORD.findall(query[:MAX_QUERY])[:MAX_TERMS]


def _pieces(snippet: str) -> list[tuple[str, bool]]:
    """'a \x01b\x02 c' → [('a ', False), ('b', True), (' c', False)]."""
    pieces: list[tuple[str, bool]] = []
    for index, part in enumerate(re.split(f"[{START}{STOP}]", snippet)):
        if part:
            pieces.append((part, index % 2 == 1))
    return pieces


def _sqlite(words: list[str], limit: int) -> list[tuple[int, str]]:
    # Each word quoted (FTS5 syntax in a query is the user's text, not ours), as a prefix;
    # all must match.
    match = " ".join('"' + word.replace('"', '""') + '"*' for word in words)
    sql = (
        "SELECT e.id, snippet(search_fts, 0, char(1), char(2), '…', 24) "
        "FROM search_fts JOIN search_searchentry e ON e.id = search_fts.rowid "
        "WHERE search_fts MATCH %s ORDER BY bm25(search_fts), e.id DESC LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [match, limit])
        return list(cursor.fetchall())


def _postgres(words: list[str], limit: int) -> list[tuple[int, str]]:
    # Each word as a prefix (`word:*`), all must match; to_tsquery gets only \w+ words.
    query = " & ".join(f"{word}:*" for word in words)
    options = f"StartSel={START},StopSel={STOP},MaxWords=30,MinWords=12,MaxFragments=2"
    sql = (
        "SELECT e.id, ts_headline('english', e.text, q, %s) "
        "FROM search_searchentry e, to_tsquery('english', %s) q "
        "WHERE to_tsvector('english', e.text) @@ q "
        "ORDER BY ts_rank(to_tsvector('english', e.text), q) DESC, e.id DESC LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [options, query, limit])
        return list(cursor.fetchall())


def search(query: str, limit: int = 50) -> list[Hit]:
    """The best matches for `query` across every session, best first."""
    words = terms(query)
    if not words:
        return []
    engine = _postgres if connection.vendor == "postgresql" else _sqlite
    rows = engine(words, limit)
    found = SearchEntry.objects.select_related("session").in_bulk([row[0] for row in rows])
    hits = []
    for entry_id, snippet in rows:
        entry = found.get(entry_id)
        if entry is not None:
            hits.append(
                Hit(entry.session, entry.seq, entry.kind, entry.created_at, _pieces(snippet))
            )
    return hits
