"""Bridge leases: which worker holds a session's upstream socket, fenced by an epoch.

The lease lives on the session row: `bridge_owner`, `bridge_lease_until` and
`bridge_epoch`. The API is four calls, all synchronous (wrap them for async code):

- `claim(owner, exclude)` takes every live session whose lease is free, expired, or
  already `owner`'s (a restarted worker with a stable id takes its own back at once). Each
  claim advances the epoch and returns a `Lease(session_id, owner, epoch)`.
- Every write to a session (`recording.append_events`) locks its row first
  (`locked_session`) and ends with `update_held(session_id, lease, ...)`: one `UPDATE ...
  WHERE id AND owner AND epoch AND lease_until > now` of the fields it changed, that also
  extends the lease. The lease is checked while the lock is held, so a stale owner
  (paused, partitioned, slow) writes nothing: `LeaseLost` rolls its transaction back.
- `renew(lease)` is the same check outside a write: every `RENEW_SECONDS`, and before
  every upstream send (stdin), so a stale owner sends nothing either.
- `release(lease)` on a clean stop, so another worker can claim at once.

Workers also beat a heartbeat (`heartbeat`, `BridgeWorker`), so the web side knows
whether anything will pick a new session up (`workers_alive`) and whether a session's
lease is held now (`held`).

Times are the database's (`Now()`: `STATEMENT_TIMESTAMP()` on PostgreSQL), never a
worker's clock. No call waits on another worker's lock: claims skip locked rows
(`SKIP LOCKED`), and every transaction that touches a session row on PostgreSQL sets a
short `lock_timeout` and `idle_in_transaction_session_timeout`, so a frozen owner holds a
row for seconds, not for as long as TCP keepalive takes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import DateTimeField, Expression, ExpressionWrapper, F, Field, Q, QuerySet
from django.db.models.functions import Now

from dashboard.agents.models import AgentSession, BridgeWorker, SessionId
from dashboard.agents.sqlwrite import db_value

LEASE_SECONDS = 10.0
RENEW_SECONDS = 3.0
# A live session with no lease for longer than this is shown as having no bridge.
UNBRIDGED_WARNING_SECONDS = 8.0


class LeaseLost(Exception):
    """Another worker holds this session's bridge now (or the lease lapsed): stop."""


@dataclass(frozen=True)
class Lease:
    session_id: str
    owner: str
    epoch: int | None  # None: any epoch of this owner (tests and benchmarks only)


def _until() -> Expression:
    return ExpressionWrapper(Now() + timedelta(seconds=LEASE_SECONDS), output_field=DateTimeField())


# `set_config(..., true)` is `SET LOCAL`: for the rest of the transaction.
BOUNDED_WAITS = (
    "SELECT set_config('lock_timeout', '2s', true),"
    " set_config('idle_in_transaction_session_timeout', '5s', true)"
)


def bounded_waits() -> None:
    """Inside a transaction on PostgreSQL: never wait long on another worker's row lock,
    and never hold ours for long if this worker freezes mid-transaction. (A write that
    starts with `locked_session` has this in its first statement.)"""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(BOUNDED_WAITS)


def _held(lease: Lease) -> Q:
    condition = Q(id=lease.session_id, bridge_owner=lease.owner, bridge_lease_until__gt=Now())
    if lease.epoch is not None:
        condition &= Q(bridge_epoch=lease.epoch)
    return condition


@functools.lru_cache(maxsize=1024)
def _held_row(lease: Lease) -> QuerySet[AgentSession]:
    """The session's row while `lease` holds it (`Now()` is the database's, each time the
    query runs), built once per lease: a bridge writes through it for every batch, and
    building the filter cost half as much again as the UPDATE it filters."""
    return AgentSession.objects.filter(_held(lease))


def locked_session(session_id: SessionId) -> AgentSession:
    """Inside a write transaction, first: the session's row, locked until the transaction
    ends (on SQLite the transaction itself holds the database), and on PostgreSQL the
    transaction's waits bounded (`bounded_waits`) before the lock is waited for. One plain
    statement, loaded as the ORM would load it: compiling the ORM's query cost more than
    running it, a statement of its own for the bounds a round trip, and a RawQuerySet's
    loading a quarter of a one-event record on SQLite, on the path of every recorded event."""
    sql = _locking_select(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(sql, [db_value(AgentSession, "id", session_id)])
        row = cursor.fetchone()
    if row is None:
        raise AgentSession.DoesNotExist(session_id)
    names, loaders = _session_loading(connection.vendor)
    values = []
    for value, converters in zip(row, loaders, strict=True):
        for convert, column in converters:
            value = convert(value, column, connection)
        values.append(value)
    return AgentSession.from_db(connection.alias, names, values)


@functools.cache
def _session_fields() -> tuple[Field[Any, Any], ...]:
    """The session's columns, in the order its model takes them."""
    return tuple(
        field
        for field in AgentSession._meta.get_fields()
        if isinstance(field, Field) and field.concrete and field.column
    )


Converters = tuple[tuple[Callable[[Any, Any, Any], Any], Any], ...]


@functools.cache
def _session_loading(vendor: str) -> tuple[list[str], list[Converters]]:
    """For each of those columns, its attribute's name and what turns the database's value
    into the field's (the backend's converters, then the field's, as a query applies them:
    SQLite gives times as text, PostgreSQL JSON as text), looked up once per database."""
    table = AgentSession._meta.db_table
    names, loaders = [], []
    for field in _session_fields():
        column = field.get_col(table)
        converters = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        names.append(field.attname)
        loaders.append(tuple((convert, column) for convert in converters))
    return names, loaders


@functools.cache
def _locking_select(vendor: str) -> str:
    """`locked_session`'s statement, built once per database. The lock is the weakest that
    keeps every writer of the row in turn (`FOR NO KEY UPDATE` on PostgreSQL): rows of other
    tables that refer to the session (events, search entries) check it with a `KEY SHARE`
    lock, which `FOR UPDATE` would make wait for the whole write, and which would wait for
    each such insert (the search index's, on a thread of its own) in turn."""
    quote = connection.ops.quote_name
    table, key = quote(AgentSession._meta.db_table), quote("id")
    names = [quote(str(field.column)) for field in _session_fields()]  # as `from_db` takes them
    if vendor == "postgresql":
        # The bounds in a CTE joined to the row: the row is locked (LockRows, above the
        # join) only once the join has produced it, so after `set_config` has run.
        columns = ", ".join(f"s.{column}" for column in names)
        return (
            f"WITH bounded AS MATERIALIZED ({BOUNDED_WAITS}) "
            f"SELECT {columns} FROM {table} s, bounded WHERE s.{key} = %s FOR NO KEY UPDATE OF s"
        )
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    return f"SELECT {', '.join(names)} FROM {table} WHERE {key} = %s{lock}"


def update_held(session_id: SessionId, lease: Lease | None, **values: Any) -> None:
    """Inside the write transaction that locked the row (`locked_session`): write `values` to
    it and, given a lease, only if the lease still holds the session, extending it; else
    `LeaseLost`, which rolls the whole write back. The lock was taken first, so a stale
    owner (paused, partitioned, slow) commits nothing."""
    if connection.vendor in _DATABASE_CLOCK:
        # The statement, built once per set of columns: compiling the ORM's UPDATE cost
        # more than three times as much CPU as running it (0.43 ms against 0.08), an eighth
        # of a paced one-event record's CPU on SQLite.
        sql = _held_update(
            connection.vendor,
            tuple(values),
            lease is not None,
            lease is not None and lease.epoch is not None,
        )
        params = [db_value(AgentSession, name, value) for name, value in values.items()]
        params.append(db_value(AgentSession, "id", session_id))
        if lease is not None:
            params.append(lease.owner)
            if lease.epoch is not None:
                params.append(lease.epoch)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            written = cursor.rowcount
    elif lease is None:  # another database: the ORM's statement
        AgentSession.objects.filter(id=session_id).update(**values)
        return
    else:
        # The lease's own session, as every caller passes; its filter is built once.
        written = _held_row(lease).update(**values, bridge_lease_until=_until())
    if lease is not None and not written:
        raise LeaseLost(lease.session_id)


# The database's clock as `Now()` reads it, and that clock a lease's length later, on the
# databases `update_held` writes its own statement for. SQLite's is text, as Django stores
# its times (the same as `Now()` there; `%` doubled for the driver's parameter style).
_DATABASE_CLOCK = {
    "postgresql": (
        "STATEMENT_TIMESTAMP()",
        f"STATEMENT_TIMESTAMP() + interval '{LEASE_SECONDS} seconds'",
    ),
    "sqlite": (
        "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')",
        f"STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW', '+{LEASE_SECONDS} seconds')",
    ),
}


@functools.cache
def _held_update(vendor: str, columns: tuple[str, ...], fenced: bool, with_epoch: bool) -> str:
    """`update_held`'s statement: what `_held_row(lease).update(...,
    bridge_lease_until=_until())` says, times from the database's clock."""
    quote = connection.ops.quote_name
    meta = AgentSession._meta

    def column(name: str) -> str:
        field = meta.get_field(name)
        assert isinstance(field, Field)
        return quote(str(field.column))

    now, until = _DATABASE_CLOCK[vendor]
    sets = [f"{column(name)} = %s" for name in columns]
    conditions = [f"{column('id')} = %s"]
    if fenced:
        sets.append(f"{column('bridge_lease_until')} = {until}")
        conditions += [f"{column('bridge_owner')} = %s", f"{column('bridge_lease_until')} > {now}"]
        if with_epoch:
            conditions.append(f"{column('bridge_epoch')} = %s")
    table = quote(meta.db_table)
    return f"UPDATE {table} SET {', '.join(sets)} WHERE {' AND '.join(conditions)}"


def renew(lease: Lease) -> bool:
    """Extend the lease if it is still held (by this owner, at this epoch)."""
    with transaction.atomic():
        bounded_waits()
        return bool(_held_row(lease).update(bridge_lease_until=_until()))


def release(lease: Lease) -> None:
    """Let another worker claim at once (a clean stop, an exit)."""
    condition = Q(id=lease.session_id, bridge_owner=lease.owner)
    if lease.epoch is not None:
        condition &= Q(bridge_epoch=lease.epoch)
    with transaction.atomic():
        bounded_waits()
        AgentSession.objects.filter(condition).update(bridge_owner="", bridge_lease_until=None)


def _free_for(owner: str) -> Q:
    """Rows whose lease nobody holds, has lapsed, or is already `owner`'s."""
    return (
        Q(bridge_lease_until__isnull=True)
        | Q(bridge_lease_until__lte=Now())
        | Q(bridge_owner=owner)
    )


def _claimable(owner: str) -> Q:
    return Q(status__in=AgentSession.LIVE_STATUSES) & _free_for(owner)


def _unfinished(owner: str) -> Q:
    """Ended sessions whose bridge stopped before it finished (indexed the end, released
    the lease: `supervisor.BridgeSupervisor._run_bridge`), and whose lease has lapsed."""
    return Q(status__in=AgentSession.FINISHED_STATUSES) & ~Q(bridge_owner="") & _free_for(owner)


def claim(
    owner: str, exclude: set[str] | frozenset[str] = frozenset(), limit: int = 50
) -> list[Lease]:
    """Take the leases of live sessions nobody holds, without waiting on any lock."""
    return _claim(_claimable(owner), owner, exclude, limit)


def claim_unfinished(
    owner: str, exclude: set[str] | frozenset[str] = frozenset(), limit: int = 10
) -> list[Lease]:
    """Take the leases of ended sessions that a bridge left unfinished (`_unfinished`)."""
    return _claim(_unfinished(owner), owner, exclude, limit)


def _claim(condition: Q, owner: str, exclude: set[str] | frozenset[str], limit: int) -> list[Lease]:
    leases: list[Lease] = []
    with transaction.atomic():
        bounded_waits()
        candidates = list(
            AgentSession.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(condition)
            .exclude(id__in=list(exclude))
            .values_list("id", flat=True)[:limit]
        )
        for session_id in candidates:
            won = (
                AgentSession.objects.filter(condition, id=session_id)
                .exclude(id__in=list(exclude))
                .update(
                    bridge_owner=owner,
                    bridge_lease_until=_until(),
                    bridge_epoch=F("bridge_epoch") + 1,
                )
            )
            if won:
                epoch = AgentSession.objects.values_list("bridge_epoch", flat=True).get(
                    id=session_id
                )
                leases.append(Lease(str(session_id), owner, epoch))
    return leases


def current(session_id: str, owner: str) -> Lease | None:
    """The lease `owner` holds on a session now, if any (for bridges started by hand)."""
    epoch = (
        AgentSession.objects.filter(id=session_id, bridge_owner=owner)
        .values_list("bridge_epoch", flat=True)
        .first()
    )
    return None if epoch is None else Lease(session_id, owner, epoch)


def held(session_id: SessionId) -> bool:
    """Whether some worker holds the session's lease now (by the database's clock)."""
    return AgentSession.objects.filter(id=session_id, bridge_lease_until__gt=Now()).exists()


def unbridged(session_id: SessionId) -> bool:
    """A live session no lease has covered for `UNBRIDGED_WARNING_SECONDS`: nothing records
    it (no `bridges` process, or every one of them is stuck)."""
    grace = Now() - timedelta(seconds=UNBRIDGED_WARNING_SECONDS)
    return (
        AgentSession.objects.filter(id=session_id, status__in=AgentSession.LIVE_STATUSES)
        .filter(
            Q(bridge_lease_until__isnull=True, started_at__lt=grace)
            | Q(bridge_lease_until__lt=grace)
        )
        .exists()
    )


HEARTBEAT_STALE_SECONDS = 10.0


def heartbeat(owner: str) -> None:
    """This worker is alive (called every supervisor tick)."""
    updated = BridgeWorker.objects.filter(name=owner).update(seen_at=Now())
    if not updated:
        BridgeWorker.objects.update_or_create(
            name=owner, defaults={"seen_at": Now(), "started_at": Now()}
        )


def retire(owner: str) -> None:
    """A clean stop: this worker records nothing more."""
    BridgeWorker.objects.filter(name=owner).delete()


def workers_alive() -> bool:
    """Whether any bridges worker was seen lately."""
    recent = Now() - timedelta(seconds=HEARTBEAT_STALE_SECONDS)
    return BridgeWorker.objects.filter(seen_at__gt=recent).exists()
