"""What Porthole's commands share."""

from __future__ import annotations

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor


def unapplied_migrations(alias: str = DEFAULT_DB_ALIAS) -> list[str]:
    """The migrations this code has that the database lacks ("app.name"). DatabaseError
    when the database cannot be read."""
    executor = MigrationExecutor(connections[alias])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return [f"{migration.app_label}.{migration.name}" for migration, _ in plan]


def require_migrated() -> None:
    """Refuse to start on a database that lacks tables or columns this code needs: every
    page, every bridge would fail. (`python3 dev.py start` migrates first; a deployment
    runs `manage.py migrate` before its workers.)"""
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        pending = unapplied_migrations()
    except DatabaseError as exc:
        raise CommandError(
            f"Cannot reach the database ({connection.settings_dict['NAME']}): {exc}"
        ) from exc
    if pending:
        apps = sorted({name.split(".", 1)[0] for name in pending})
        raise CommandError(
            f"The database ({connection.settings_dict['NAME']}) has {len(pending)} "
            f"unapplied migration(s), for {', '.join(apps)}: run `manage.py migrate` "
            "first (`python3 dev.py start` does)."
        )
