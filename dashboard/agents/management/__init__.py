"""What Porthole's commands share."""

from __future__ import annotations

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor


def require_migrated() -> None:
    """Refuse to start on a database that lacks tables or columns this code needs: every
    page, every bridge would fail. (`python3 dev.py start` migrates first; a deployment
    runs `manage.py migrate` before its workers.)"""
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError as exc:
        raise CommandError(
            f"Cannot reach the database ({connection.settings_dict['NAME']}): {exc}"
        ) from exc
    if pending:
        apps = sorted({migration.app_label for migration, _ in pending})
        raise CommandError(
            f"The database ({connection.settings_dict['NAME']}) has {len(pending)} "
            f"unapplied migration(s), for {', '.join(apps)}: run `manage.py migrate` "
            "first (`python3 dev.py start` does)."
        )
