"""The one definition of "needs attention", as a queryset annotation.

A session needs attention when, since the last follow-up (a prompt sent from here, a new turn
the agent began for anyone else, a "continue" into a new session, or someone marking it as
handled):

- its turn ended with an error: a `result` whose subtype is an error or whose `is_error` is
  true, or an `error` line from the wrapper;
- a gap was recorded (output evicted before it could be stored);
- it has sat idle after a completed turn for longer than PORTHOLE_ATTENTION_IDLE_MINUTES;

or, whatever happened before, when its agent exited with a non-zero code or its upstream was
lost (unless someone continued it, or marked it as handled after it ended). A session someone
killed does not need attention: a person ended it on purpose.

Marking as handled is for the whole team, like the rest of the record: it is an event in the
session's timeline ("alice marked the session as handled"), so everyone sees who did it and
when, and anything that goes wrong afterwards needs attention again.

Everything is derived from what recording already stores (the session's status and exit code,
the events' source/type/subtype and `raw`), so the list filter, the badges, the browser
notifications and the webhooks all read the same annotation. Sandbox output is never parsed as
JSON by the database: `is_error` is matched with a regular expression on the raw line, which no
line a sandbox prints can turn into a failing query.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import (
    BooleanField,
    DateTimeField,
    Exists,
    ExpressionWrapper,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
)
from django.db.models.functions import Coalesce, Greatest, Now

from dashboard.agents.models import AgentSession, Event

# An unescaped top-level-looking `"is_error": true`; `\"is_error\"` inside a string is not one.
# Read alike by PostgreSQL's regular expressions and Python's (Django's REGEXP on SQLite).
IS_ERROR_PATTERN = r'(^|[^\\])"is_error"\s*:\s*true'

ACKNOWLEDGED = Q(source=Event.Source.DASHBOARD, type="acknowledged")
# What starts a turn afresh: a prompt, a continuation, a mark as handled, the agent's init.
FOLLOW_UPS = (
    Q(source=Event.Source.DASHBOARD, type="prompt"),
    Q(source=Event.Source.DASHBOARD, type="continue"),
    ACKNOWLEDGED,
    Q(source=Event.Source.AGENT, type="system", subtype="init"),
)
CONTINUED = Q(source=Event.Source.DASHBOARD, type="continue")
ENDED = Q(source=Event.Source.BRIDGE, type__in=["exit", "lost"])

REASONS = {
    "failed": "the agent exited with an error code",
    "lost": "the sandbox lost the session",
    "error": "the last turn ended with an error",
    "gap": "output was lost before it could be recorded",
    "idle": "idle after a turn, nobody followed up",
}
FLAGS = tuple(f"attention_{name}" for name in REASONS)
# Filter an annotated queryset with this.
NEEDS_ATTENTION = (
    Q(attention_failed=True)
    | Q(attention_lost=True)
    | Q(attention_error=True)
    | Q(attention_gap=True)
    | Q(attention_idle=True)
)


def reason_labels(reasons: object) -> list[str]:
    """The labels of the reason names a mark recorded, whatever the field holds."""
    names = reasons if isinstance(reasons, list) else []
    return [REASONS[name] for name in names if isinstance(name, str) and name in REASONS]


def idle_threshold() -> timedelta:
    return timedelta(minutes=settings.PORTHOLE_ATTENTION_IDLE_MINUTES)


def _boolean(q: Q) -> ExpressionWrapper[Q]:
    return ExpressionWrapper(q, output_field=BooleanField())


def with_attention(
    sessions: QuerySet[AgentSession], *, now: datetime | None = None
) -> QuerySet[AgentSession]:
    """The sessions, each annotated with `attention_turn` (the seq of the last follow-up, 0 if
    none) and one boolean per reason (`attention_failed`, `_lost`, `_error`, `_gap`, `_idle`)."""
    # Without an explicit `now`, the database's clock: a queryset built once (the list's filter
    # table) still judges idleness when it runs.
    cutoff: Any = (
        now - idle_threshold()
        if now is not None
        else ExpressionWrapper(Now() - Value(idle_threshold()), output_field=DateTimeField())
    )
    events = Event.objects.filter(session=OuterRef("pk"))
    # The last follow-up, looked for by source and type apiece (the index on session,
    # source, type and seq finds each at once): as one OR it was a walk back through every
    # event to the last, ~30 ms a session of 40,000 events, repeated in each flag below.
    last = [
        Coalesce(Subquery(events.filter(q).order_by("-seq").values("seq")[:1]), Value(0))
        for q in FOLLOW_UPS
    ]
    sessions = sessions.annotate(attention_turn=Greatest(*last))
    since = Event.objects.filter(session=OuterRef("pk"), seq__gt=OuterRef("attention_turn"))
    # One look per kind of line, as for the follow-ups: as one OR over two types the look
    # walked every agent event since the last follow-up (13 ms a 40,000-event turn).
    error_line = Exists(since.filter(source=Event.Source.AGENT, type="error")) | Exists(
        since.filter(
            Q(subtype__startswith="error") | Q(raw__regex=IS_ERROR_PATTERN),
            source=Event.Source.AGENT,
            type="result",
        )
    )
    not_killed = ~Q(status=AgentSession.Status.KILLED)
    # The last follow-up is someone marking it as handled, and it did not end after that.
    handled_since_end = Exists(events.filter(ACKNOWLEDGED, seq=OuterRef("attention_turn"))) & ~Q(
        Exists(since.filter(ENDED))
    )
    still_open = ~Exists(events.filter(CONTINUED)) & ~Q(handled_since_end)
    return sessions.annotate(
        attention_failed=_boolean(
            Q(status=AgentSession.Status.EXITED)
            & (Q(exit_code__lt=0) | Q(exit_code__gt=0))
            & Q(still_open)
        ),
        attention_lost=_boolean(Q(status=AgentSession.Status.LOST) & Q(still_open)),
        attention_error=_boolean(not_killed & Q(error_line)),
        attention_gap=_boolean(
            not_killed & Q(Exists(since.filter(source=Event.Source.BRIDGE, type="gap")))
        ),
        attention_idle=_boolean(
            Q(status=AgentSession.Status.IDLE)
            & Q(
                Exists(
                    since.filter(
                        source=Event.Source.AGENT, type="turn_complete", created_at__lt=cutoff
                    )
                )
            )
        ),
    )


def idle_in(session: Any, now: datetime) -> timedelta | None:
    """How long until `session` (annotated by `with_attention`) needs attention for sitting
    idle, if nothing happens meanwhile: the `attention_idle` rule above, read forwards. None
    when it never will as things stand (not idle, no turn ended since the last follow-up, or
    idle for long enough already)."""
    if session.status != AgentSession.Status.IDLE or session.attention_idle:
        return None
    ended = (
        Event.objects.filter(
            session=session,
            seq__gt=session.attention_turn,
            source=Event.Source.AGENT,
            type="turn_complete",
        )
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    return None if ended is None else max(ended + idle_threshold() - now, timedelta(0))


def needing_attention(
    sessions: QuerySet[AgentSession] | None = None, *, now: datetime | None = None
) -> QuerySet[AgentSession]:
    base = sessions if sessions is not None else AgentSession.objects.all()
    return with_attention(base, now=now).filter(NEEDS_ATTENTION)


@dataclass(frozen=True)
class Attention:
    reasons: tuple[str, ...]
    turn: int

    def __bool__(self) -> bool:
        return bool(self.reasons)

    @property
    def labels(self) -> list[str]:
        return [REASONS[reason] for reason in self.reasons]

    @property
    def summary(self) -> str:
        return "; ".join(self.labels)


def of(session: Any) -> Attention:
    """The reasons of a session annotated by `with_attention` (or fetched, when it is not)."""
    if not hasattr(session, "attention_turn"):
        annotated = with_attention(AgentSession.objects.filter(pk=session.pk)).first()
        if annotated is None:
            return Attention(reasons=(), turn=0)
        session = annotated
    reasons = tuple(name for name in REASONS if getattr(session, f"attention_{name}", False))
    return Attention(reasons=reasons, turn=int(session.attention_turn or 0))


def for_sessions(ids: Iterable[object]) -> dict[str, Attention]:
    annotated = with_attention(AgentSession.objects.filter(pk__in=list(ids)))
    return {str(session.pk): of(session) for session in annotated}
