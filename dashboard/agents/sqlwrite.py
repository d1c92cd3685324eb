"""Writing many rows fast: one INSERT statement, run for every row (`executemany`).

`bulk_create` builds and compiles a statement with a placeholder per value for every
batch, which cost more than the write itself on the recording path (about 150 µs an
event in a flood); this statement is the same text each time, and the drivers run it in
a loop in C (sqlite3) or pipelined (psycopg). No primary key comes back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection, models


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
    verb, suffix = "INSERT INTO", ""
    if ignore_conflicts:  # the two databases Porthole runs on say it differently
        if connection.vendor == "sqlite":
            verb = "INSERT OR IGNORE INTO"
        else:
            suffix = " ON CONFLICT DO NOTHING"
    sql = "{} {} ({}) VALUES ({}){}".format(
        verb, quote(meta.db_table), ", ".join(names), ", ".join(["%s"] * len(names)), suffix
    )
    with connection.cursor() as cursor:
        cursor.executemany(sql, list(rows))
