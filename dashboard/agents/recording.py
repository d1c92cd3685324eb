"""Storing events once, in order, and telling every viewer.

Both the bridge (agent output) and the views (attributed actions) append through
`append_events`: it takes the session's row lock, hands out the next seqs and inserts
in one transaction, so seqs are gap-free whichever worker writes. A bridge passes its
lease owner and the write is refused once another worker holds the lease: that, with
the unique `(session, seq)`, is the fence against a stale bridge.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import DataError, IntegrityError, transaction
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard import metrics
from dashboard.agents.forms import controls_context
from dashboard.agents.leases import Lease, LeaseLost, locked_session, update_held
from dashboard.agents.masking import mask_line
from dashboard.agents.models import AgentSession, Event, SessionId
from dashboard.agents.rendering import LiveFragment, ToolIndex, render_event_live
from dashboard.agents.rendering.porthole import for_link_holders, link_holder_variant
from dashboard.agents.sqlwrite import (
    commit_without_waiting_for_the_disk,
    db_value,
    insert_many,
    update_many,
)
from dashboard.awareness import attention
from dashboard.gil import HandOver
from dashboard.search.index import index_events

log = logging.getLogger(__name__)

SESSIONS_GROUP = "sessions"
# The channel layer of sessions' live streams (`session_group`), apart from the default one
# that carries the rest (revocations, the session list, wake-ups): at most once, since a
# viewer that misses a message catches up from the database (`fanout.Feed`).
LIVE_LAYER = "live"
_SESSION_GROUP = "session."


def session_group(session_id: SessionId) -> str:
    return f"{_SESSION_GROUP}{session_id}"


def live_layer() -> Any:
    return get_channel_layer(LIVE_LAYER)


def user_group(user_id: object) -> str:
    """Every socket of one person, to close them when their access is taken away."""
    return f"user.{user_id}"


def bridge_group(session_id: SessionId) -> str:
    return f"bridge.{session_id}"


@dataclass
class NewEvent:
    source: str
    raw: str
    type: str = ""
    subtype: str = ""
    actor_id: int | None = None
    data: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_line(cls, source: str, raw: str, data: dict[str, Any] | None) -> NewEvent:
        raw, data = mask_line(raw, data)
        raw = storable(raw)
        if source == Event.Source.STDERR:
            return cls(source=source, raw=raw, type="stderr")
        kind = data.get("type") if data else None
        subtype = data.get("subtype") if data else None
        return cls(source=source, raw=raw, type=_label(kind), subtype=_label(subtype), data=data)

    @classmethod
    def ours(cls, source: str, data: dict[str, Any], actor_id: int | None = None) -> NewEvent:
        raw, masked = mask_line(json.dumps(data, ensure_ascii=False), data)
        return cls(
            source=source,
            raw=storable(raw),
            type=str(data.get("type", "")),
            actor_id=actor_id,
            data=masked,
        )


def storable(text: str) -> str:
    """Text every backend accepts: PostgreSQL refuses NUL in text, and no database encoding
    takes a lone surrogate (a JSON `"\\udfff"` decodes to one). A NUL is kept visible as the
    six characters `\\u0000`; a lone surrogate becomes "?"."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")  # each lone surrogate: "?"
    return text


def _label(value: object, length: int = 64) -> str:
    """A string from a sandbox fit for a bounded column."""
    if not isinstance(value, str):
        return ""
    return storable(value)[:length]


# The columns' limits: totals saturate there instead of failing the write. Cost is a
# DecimalField(12, 6); turns a PositiveIntegerField (int4 on PostgreSQL); the rest bigint.
MAX_COST = Decimal("999999.999999")
MAX_INT = 2**31 - 1
MAX_BIGINT = 2**63 - 1


def _as_decimal(value: object) -> Decimal:
    """A non-negative cost within the column, from whatever a `result` line holds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return Decimal(0)
    try:
        number = Decimal(str(value)[:64])
    except (InvalidOperation, ValueError):
        return Decimal(0)
    if not number.is_finite() or number <= 0:
        return Decimal(0)
    return min(number, MAX_COST).quantize(Decimal("0.000001"))


def _as_int(value: object, limit: int = MAX_BIGINT) -> int:
    """A non-negative count within `limit`; NaN, infinities, negatives and non-numbers are 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return int(min(max(value, 0), limit))


def _add(total: int, more: int, limit: int = MAX_BIGINT) -> int:
    return min(total + more, limit)


def apply_to_session(session: AgentSession, event: NewEvent) -> None:
    """Let the session's status and totals follow what the stream says."""
    data = event.data or {}
    if event.source == Event.Source.AGENT:
        if event.type == "system" and event.subtype == "init":
            session.status = AgentSession.Status.WORKING
            model = _label(data.get("model"), 128)
            if model:
                session.model = model
            claude_id = _label(data.get("session_id"), 128)
            if claude_id and not session.claude_session_id:
                session.claude_session_id = claude_id
        elif event.type == "ready" and session.status == AgentSession.Status.STARTING:
            session.status = AgentSession.Status.IDLE
        elif event.type == "result":
            cost = Decimal(session.total_cost_usd) + _as_decimal(data.get("total_cost_usd"))
            session.total_cost_usd = min(cost, MAX_COST)
            turns = _as_int(data.get("num_turns"), MAX_INT)
            session.num_turns = _add(session.num_turns, turns, MAX_INT)
            session.duration_ms = _add(session.duration_ms, _as_int(data.get("duration_ms")))
            found = data.get("usage")
            usage: dict[str, Any] = found if isinstance(found, dict) else {}
            session.input_tokens = _add(session.input_tokens, _as_int(usage.get("input_tokens")))
            session.output_tokens = _add(session.output_tokens, _as_int(usage.get("output_tokens")))
        elif event.type == "turn_complete":
            session.status = AgentSession.Status.IDLE
            claude_id = _label(data.get("claude_session_id"), 128)
            if claude_id:
                session.claude_session_id = claude_id
        elif event.type == "interrupted" and session.is_live:
            session.status = AgentSession.Status.IDLE
    elif event.source == Event.Source.DASHBOARD:
        if event.type == "prompt" and session.is_live:
            session.status = AgentSession.Status.WORKING
    elif event.source == Event.Source.BRIDGE:
        if event.type == "exit":
            code = data.get("code")
            in_range = isinstance(code, int) and -(2**31) <= code < 2**31
            session.exit_code = code if in_range else None
            session.status = (
                AgentSession.Status.KILLED if session.kill_requested else AgentSession.Status.EXITED
            )
            session.ended_at = timezone.now()
        elif event.type == "lost":
            session.status = AgentSession.Status.LOST
            session.ended_at = timezone.now()


@dataclass
class Drawn:
    """One event as rendered while it was stored: what its viewers are sent (None when it
    could not be rendered), and what share-link holders are sent where that differs."""

    seq: int
    oob: str | None
    for_link_holders: str | None = None
    differs: bool = False


# Renders a batch inside the transaction that stores it, once its seqs are known: each
# element a page would draw the same way goes into the database with its row (`Event.html`).
Drawer = Callable[[list[Event]], list[Drawn]]


@dataclass
class Appended:
    session: AgentSession
    events: list[Event]
    state_changed: bool
    drawn: list[Drawn] = field(default_factory=list)
    # Stored behind events a bridge has yet to draw (`undrawn_from`): announcing these now
    # would put them before those; the bridge's drawer announces them in their turn.
    held: bool = False


STATE_FIELDS = (
    "status",
    "model",
    "claude_session_id",
    "exit_code",
    "total_cost_usd",
    "num_turns",
    "duration_ms",
    "input_tokens",
    "output_tokens",
    "ended_at",
)


def _state(session: AgentSession) -> tuple[object, ...]:
    return tuple(getattr(session, name) for name in STATE_FIELDS)


def append_events(
    session_id: SessionId,
    new_events: Sequence[NewEvent],
    *,
    lease: Lease | None = None,
    lease_owner: str | None = None,
    draw: Drawer | None = None,
    deferred: bool = False,
) -> Appended:
    """Store events with the next seqs; apply them to the session.

    A bridge passes its lease: the fence is checked inside this transaction, while the row
    lock is held, so a stale bridge writes nothing (`LeaseLost`). `lease_owner` alone (any epoch of
    that owner) is for tests and benchmarks that play a bridge. `draw` renders the rows
    before they are inserted (see `record`); `deferred` stores them to be drawn later, by
    the bridge that fell behind (`store`, `draw_stored`).
    """
    if lease is None and lease_owner is not None:
        lease = Lease(str(session_id), lease_owner, None)
    now = timezone.now()
    with transaction.atomic():
        session = locked_session(session_id)  # first: on PostgreSQL it bounds the waits
        before = _state(session)
        held = session.undrawn_from is not None
        rows = []
        for offset, new in enumerate(new_events):
            rows.append(
                Event(
                    session=session,
                    seq=session.next_seq + offset,
                    source=new.source,
                    type=new.type,
                    subtype=new.subtype,
                    raw=new.raw,
                    actor_id=new.actor_id,
                    created_at=now,
                )
            )
            apply_to_session(session, new)
        for row, new in zip(rows, new_events, strict=True):
            if new.data is not None:
                row._data = new.data  # spare the indexer and the renderer a second parse
        drawn = draw(rows) if draw is not None and rows else []
        _insert(rows)
        session.next_seq += len(rows)
        if rows:
            session.last_event_at = now
        after = _state(session)
        changed = [
            name for name, old, new in zip(STATE_FIELDS, before, after, strict=True) if old != new
        ]
        if deferred and rows and not held:
            session.undrawn_from = rows[0].seq
            changed.append("undrawn_from")
        written = {name: getattr(session, name) for name in [*changed, "next_seq", "last_event_at"]}
        update_held(session.pk, lease, **written)
    return Appended(
        session=session,
        events=rows,
        state_changed=after != before,
        drawn=[] if held else drawn,  # announced by the bridge's drawer in their turn
        held=held,
    )


def _insert(rows: Sequence[Event]) -> None:
    """The batch's rows in one statement (`insert_many`), each with its element where it
    has one; they share their session and time, prepared for the database once. No primary
    key comes back: nothing downstream needs one."""
    if not rows:
        return
    session = db_value(Event, "session", rows[0].session_id)
    created = db_value(Event, "created_at", rows[0].created_at)
    columns = ["session", "seq", "source", "type", "subtype", "raw", "actor", "created_at", "html"]
    insert_many(
        Event,
        columns,
        [
            (
                session,
                row.seq,
                row.source,
                row.type,
                row.subtype,
                row.raw,
                row.actor_id,
                created,
                row.html,
            )
            for row in rows
        ],
    )


def _redraws_state(event: Event) -> bool:
    """Whether the header changes with this event though the session's fields do not: being
    marked as handled ends its "needs attention" note."""
    return event.source == Event.Source.DASHBOARD and event.type == "acknowledged"


def render_state(session: AgentSession) -> dict[str, str]:
    """The fragments that follow a session's state, rendered once for all of its viewers:
    team members, and (showing less) share-link holders."""
    context = {
        "session": session,
        "sandbox": session.sandbox,
        "attention": attention.of(session),
        **controls_context(session),
    }
    return {
        "status": render_to_string("agents/session.html#state-oob", {**context, "member": True}),
        "status_shared": render_to_string(
            "agents/session.html#state-oob", {**context, "member": False}
        ),
        "controls": render_to_string("agents/session.html#controls-oob", context),
        "row": render_to_string("agents/index.html#row", {"session": session, "oob": True}),
    }


Message = tuple[str, dict[str, Any]]


# What a line's content can make a write raise (as opposed to the database being away).
CONTENT_ERRORS: tuple[type[BaseException], ...] = (
    DataError,
    IntegrityError,
    ValueError,
    TypeError,
    ArithmeticError,
    RecursionError,
)


def quarantined(event: NewEvent, reason: str) -> NewEvent:
    """A line that could not be stored as itself, kept raw (ASCII-escaped) with the reason."""
    return NewEvent.ours(
        Event.Source.BRIDGE,
        {"type": "quarantined", "source": event.source, "reason": reason[:500], "raw": event.raw},
    )


def _append_isolating(
    session_id: SessionId,
    new_events: Sequence[NewEvent],
    lease: Lease | None,
    tools: ToolIndex | None,
) -> Appended:
    """Append a batch, rendered as it is stored (given `tools`; without, stored to be drawn
    later: `store`); if its content makes the write fail, store the lines one by one and
    keep each one that still fails as a quarantined raw event. Never a crash loop."""
    write = functools.partial(
        append_events,
        lease=lease,
        draw=None if tools is None else functools.partial(_draw, tools),
        deferred=tools is None,
    )
    try:
        return write(session_id, new_events)
    except LeaseLost:
        raise
    except CONTENT_ERRORS as exc:
        if len(new_events) == 1 and new_events[0].type == "quarantined":
            raise  # the quarantined form failed too: the database, not the content
        log.warning("session %s: a batch failed to store (%r); isolating it", session_id, exc)
    appended: Appended | None = None
    rows: list[Event] = []
    drawn: list[Drawn] = []
    # What was learned from rows that were rolled back is not true: it is learned again
    # from what is stored (a call older than what is rendered is looked up when needed).
    if tools is not None:
        tools.forget()
    held = False
    for event in new_events:
        try:
            appended = write(session_id, [event])
        except LeaseLost:
            raise
        except CONTENT_ERRORS as exc:
            log.warning("session %s: quarantining a line: %r", session_id, exc)
            reason = f"{type(exc).__name__}: {exc}"
            if tools is not None:
                tools.forget()
            appended = write(session_id, [quarantined(event, storable(reason))])
        rows += appended.events
        drawn += appended.drawn  # none of a write that was held
        held = held or appended.held
    assert appended is not None
    return Appended(
        session=appended.session, events=rows, state_changed=True, drawn=drawn, held=held
    )


def _rendered(event: Event, tools: ToolIndex) -> LiveFragment | None:
    try:
        return render_event_live(event, tools)
    except Exception:
        # Stored already; viewers get it from the database on their next load.
        log.exception("session %s: event %s could not be rendered", event.session.pk, event.seq)
        return None


def _draw(tools: ToolIndex, rows: list[Event]) -> list[Drawn]:
    """Render each of a batch's rows once (`Drawer`): its element, where a page would draw
    it exactly so, goes into the database with it (`Event.html`: no page load or catch-up
    renders it again), and what viewers are sent is returned."""
    drawn = []
    hand_over = HandOver()  # the bridge's reader waits on the event loop meanwhile
    for event in rows:
        hand_over()
        tools.observe(event)
        fragment = _rendered(event, tools)
        if fragment is None:
            drawn.append(Drawn(event.seq, None))
            continue
        # Kept only as it is: an element no database takes (a NUL, a lone surrogate: the
        # renderers clean those, this is the net) would fail the batch's INSERT.
        if fragment.article is not None and storable(fragment.article) == fragment.article:
            event.html = fragment.article
        entry = Drawn(event.seq, fragment.oob)
        if link_holder_variant(event):
            with for_link_holders():
                theirs = _rendered(event, tools)
            entry.differs = True
            entry.for_link_holders = theirs.oob if theirs is not None else None
        drawn.append(entry)
    return drawn


def record(
    session_id: SessionId,
    new_events: Sequence[NewEvent],
    *,
    tools: ToolIndex | None = None,
    lease: Lease | None = None,
    lease_owner: str | None = None,
    index: bool = True,
) -> tuple[Appended, list[Message]]:
    """Append events, render each once (in the transaction that stores them, so that an
    element is written with its row), and return the channel messages that announce them.

    The search index gets the events after that transaction, in one of its own
    (`index_events`), so that a failure there undoes nothing. Callers that announce what
    they record pass `index=False` and index after publishing, so that no viewer waits for
    the index: `record_and_publish`, and the bridge, whose `IndexFeed` writes several
    batches at once on a thread of its own."""
    if lease is None and lease_owner is not None:
        lease = Lease(str(session_id), lease_owner, None)
    if not new_events:
        return append_events(session_id, [], lease=lease), []
    tools = tools if tools is not None else ToolIndex()
    appended = _append_isolating(session_id, new_events, lease, tools)
    metrics.EVENTS_RECORDED.inc(len(appended.events))
    if index:
        index_events(appended.events)
    return appended, _announcement(appended.session.id, appended.drawn) + _state_announcement(
        appended
    )


def _announcement(session_id: SessionId, drawn: list[Drawn]) -> list[Message]:
    """The message that sends drawn events to their viewers (none if nothing was drawn)."""
    items = [(entry.seq, entry.oob) for entry in drawn if entry.oob is not None]
    if not items:
        return []
    announce: dict[str, Any] = {"type": "session.events", "items": items}
    # Link holders' own rendering, where it differs.
    shared = [(entry.seq, entry.for_link_holders) for entry in drawn if entry.differs]
    if shared:
        announce["shared"] = shared
    return [(session_group(session_id), announce)]


def changes_state(appended: Appended) -> bool:
    """Whether what was appended changes what the session's header and list row show."""
    return appended.state_changed or any(map(_redraws_state, appended.events))


def _state_announcement(appended: Appended) -> list[Message]:
    return state_messages(appended.session) if changes_state(appended) else []


def store(
    session_id: SessionId, new_events: Sequence[NewEvent], *, lease: Lease | None = None
) -> Appended:
    """Append events without drawing them (a bridge that fell behind stores first): they
    are drawn, written with their elements and announced by `draw_stored`, in order. The
    session's state, if they change it (`changes_state`), is the caller's to announce
    once those before it are."""
    appended = _append_isolating(session_id, new_events, lease, None)
    metrics.EVENTS_RECORDED.inc(len(appended.events))
    return appended


@dataclass
class DrawnStored:
    rows: list[Event]  # the events drawn, for the search index
    messages: list[Message]  # their announcement
    stored_through: int  # the session's last stored seq, as this transaction saw it


def draw_stored(
    session_id: SessionId,
    first: int,
    last: int,
    kept: dict[int, Event],
    tools: ToolIndex,
    *,
    lease: Lease | None = None,
) -> DrawnStored:
    """Draw stored events `first`..`last` in order (those in `kept` as they are, the rest
    read back), write each element with its row, and move the session's `undrawn_from`
    past them, fenced by the lease as every bridge write is. Events stored with their
    elements already (a person's action, `Appended.held`) are not rendered again."""
    rows = [kept.get(seq) for seq in range(first, last + 1)]
    missing = [seq for seq, row in zip(range(first, last + 1), rows, strict=True) if row is None]
    if missing:
        # One session for them all (`select_related` built one per row: most of the cost).
        session = AgentSession.objects.get(pk=session_id)
        found = {}
        for event in Event.objects.filter(
            session__pk=session_id, seq__gte=missing[0], seq__lte=missing[-1]
        ):
            event.session = session
            found[event.seq] = event
        rows = [
            row if row is not None else found.get(seq)
            for seq, row in zip(range(first, last + 1), rows, strict=True)
        ]
    present = [row for row in rows if row is not None]
    had = {row.seq for row in present if row.html}
    drawn = _draw(tools, present)
    with transaction.atomic():
        session = locked_session(session_id)
        # Derived, and moving `undrawn_from` in the same transaction: a crash that loses it
        # leaves those events to be drawn again, by the next bridge.
        commit_without_waiting_for_the_disk()
        stored_through = session.next_seq - 1
        update_many(
            Event,
            "html",
            ["session", "seq"],
            [
                (row.html, db_value(Event, "session", session.pk), row.seq)
                for row in present
                if row.html and row.seq not in had
            ],
        )
        undrawn_from = last + 1 if last < stored_through else None
        update_held(session.pk, lease, undrawn_from=undrawn_from)
    return DrawnStored(present, _announcement(session.pk, drawn), stored_through)


def state_messages(session: AgentSession) -> list[Message]:
    """The session's state, announced to the pages following it and to the lists."""
    state = render_state(session)
    return [
        (session_group(session.id), {"type": "session.state", **state}),
        (
            SESSIONS_GROUP,
            {"type": "sessions.row", "session": str(session.id), "html": state["row"]},
        ),
    ]


def current_state_messages(session_id: SessionId) -> list[Message]:
    """The session's state as the database has it now, to announce."""
    return state_messages(AgentSession.objects.select_related("sandbox").get(pk=session_id))


async def publish(messages: Iterable[Message]) -> None:
    for group, message in messages:
        layer = live_layer() if group.startswith(_SESSION_GROUP) else get_channel_layer()
        if layer is not None:
            await layer.group_send(group, message)


def draw_the_rest(session_id: SessionId, *, lease: Lease | None = None, size: int = 100) -> int:
    """Draw, announce and index what a session's bridge stored and never drew, a slice at a
    time: for a session that ended while its bridge was behind, and whose bridge stopped
    (no bridge will come back for it). Returns how many events it drew."""
    session = AgentSession.objects.filter(pk=session_id).first()
    if session is None or session.undrawn_from is None:
        return 0
    tools = ToolIndex()
    first, through, count = session.undrawn_from, session.next_seq - 1, 0
    while first <= through:
        last = min(through, first + size - 1)
        drawn = draw_stored(session_id, first, last, {}, tools, lease=lease)
        async_to_sync(publish)(drawn.messages)
        index_events(drawn.rows)
        count += len(drawn.rows)
        first, through = last + 1, drawn.stored_through
    # Its end (or whatever changed its state) went unannounced with the rest.
    async_to_sync(publish)(current_state_messages(session_id))
    return count


def record_and_publish(
    session_id: SessionId, new_events: Sequence[NewEvent], **kwargs: Any
) -> Appended:
    """For synchronous callers (views): store, render, announce, then index."""
    appended, messages = record(session_id, new_events, index=False, **kwargs)
    async_to_sync(publish)(messages)
    index_events(appended.events)
    return appended
