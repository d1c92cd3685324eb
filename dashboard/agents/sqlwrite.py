"""Writing many rows fast: one INSERT (or UPDATE) statement, run for every row
(`executemany`); on PostgreSQL one statement with a row of values each for a few rows, one
COPY for more.

`bulk_create` builds and compiles a statement with a placeholder per value for every
batch, which cost more than the write itself on the recording path (about 150 µs an
event in a flood); this statement is the same text each time, and sqlite3 runs it in a
loop in C. On PostgreSQL, Django's cursors bind parameters on the client, so psycopg
quoted every value in Python and the server parsed every row's INSERT anew (about 70 µs
an event, wall); `COPY ... FROM STDIN` sends the rows in one stream, formatted in C
(about 30). No primary key comes back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection, models

# COPY takes a round trip more than one INSERT (about 0.3 ms on a one-event record): it
# pays from a few rows on.
COPY_FROM = 8


def db_value(model: type[models.Model], name: str, value: Any) -> Any:
    """`value` as the database takes it for `model.name` (a foreign key's UUID, an aware
    datetime…): for values that many rows share, prepared once."""
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field.get_db_prep_save(value, connection)


def insert_many(
    model: type[models.Model],
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    ignore_conflicts: bool = False,
) -> None:
    """Insert `rows` (values in the order of `columns`, field names, prepared for the
    database: text and integers as they are, anything else through `db_value`)."""
    meta = model._meta
    quote = connection.ops.quote_name
    names = []
    for name in columns:
        field = meta.get_field(name)
        assert isinstance(field, models.Field)
        names.append(quote(str(field.column)))
    table = quote(meta.db_table)
    rows = list(rows)
    if connection.vendor == "postgresql" and not ignore_conflicts and len(rows) >= COPY_FROM:
        # COPY has no ON CONFLICT: rows that may conflict take the INSERT below.
        # psycopg's own errors, as Django's (`DataError`…) for callers to tell content
        # from the rest, as every other statement here raises them.
        with (
            connection.wrap_database_errors,
            connection.cursor() as cursor,
            cursor.copy("COPY {} ({}) FROM STDIN".format(table, ", ".join(names))) as copy,
        ):
            for row in rows:
                copy.write_row(row)
        return
    verb, suffix = "INSERT INTO", ""
    if ignore_conflicts:  # the two databases Porthole runs on say it differently
        if connection.vendor == "sqlite":
            verb = "INSERT OR IGNORE INTO"
        else:
            suffix = " ON CONFLICT DO NOTHING"
    values = "({})".format(", ".join(["%s"] * len(names)))
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and 1 < len(rows) < COPY_FROM:
            # psycopg runs `executemany` in a pipeline, which cost a record of two to seven
            # events (a loaded bridge's usual) 650 µs more CPU than a record of one: one
            # statement with a row of values each, one round trip. (Not for many rows that
            # may conflict: the search index's thousands would make one of tens of MB.)
            cursor.execute(
                "{} {} ({}) VALUES {}{}".format(
                    verb, table, ", ".join(names), ", ".join([values] * len(rows)), suffix
                ),
                [value for row in rows for value in row],
            )
            return
        sql = "{} {} ({}) VALUES {}{}".format(verb, table, ", ".join(names), values, suffix)
        if len(rows) == 1:
            cursor.execute(sql, rows[0])
        else:  # sqlite3 runs it for every row in C, psycopg in a pipeline
            cursor.executemany(sql, rows)


def update_many(
    model: type[models.Model], column: str, keys: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Set `column` on many rows, each found by `keys` (every row: the new value, then the
    keys' values, prepared as for `insert_many`). On SQLite one statement run for every
    row; on PostgreSQL one statement for them all, the values sent as arrays (`unnest`):
    run for every row, each UPDATE was a round of the server's own."""
    rows = list(rows)
    if not rows:
        return
    meta = model._meta
    quote = connection.ops.quote_name
    fields = []
    for name in [column, *keys]:
        field = meta.get_field(name)
        assert isinstance(field, models.Field)
        fields.append(field)
    names = [quote(str(field.column)) for field in fields]
    table = quote(meta.db_table)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            arrays = ", ".join(f"%s::{field.db_type(connection)}[]" for field in fields)
            given = ", ".join(f"v{n}" for n in range(len(fields)))
            matches = " AND ".join(f"{table}.{names[n]} = u.v{n}" for n in range(1, len(fields)))
            cursor.execute(
                f"UPDATE {table} SET {names[0]} = u.v0 FROM unnest({arrays}) AS u({given})"
                f" WHERE {matches}",
                [list(values) for values in zip(*rows, strict=True)],
            )
            return
        matches = " AND ".join(f"{name} = %s" for name in names[1:])
        cursor.executemany(f"UPDATE {table} SET {names[0]} = %s WHERE {matches}", rows)


def commit_without_waiting_for_the_disk() -> None:
    """On PostgreSQL, the current transaction's commit does not wait for its WAL to reach
    the disk: for writes of derived data only (the search index, elements drawn after
    storing), which a crash may lose and the next bridge writes again. Nothing is lost for
    good meanwhile: the next synchronous commit of any transaction flushes it too."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('synchronous_commit', 'off', true)")
