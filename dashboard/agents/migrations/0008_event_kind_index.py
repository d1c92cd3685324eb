from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor


class AddIndexWithoutBlockingWrites(AddIndexConcurrently):
    """On PostgreSQL built CONCURRENTLY: the events table may be large, and the workers of
    the release before keep recording into it while this runs (docs/deploy.md,
    "Upgrading without losing a session"). Elsewhere (SQLite) a plain CREATE INDEX."""

    def _as(self, schema_editor: BaseDatabaseSchemaEditor) -> type[migrations.AddIndex]:
        if schema_editor.connection.vendor == "postgresql":
            return AddIndexConcurrently
        return migrations.AddIndex

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        self._as(schema_editor).database_forwards(
            self, app_label, schema_editor, from_state, to_state
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        self._as(schema_editor).database_backwards(
            self, app_label, schema_editor, from_state, to_state
        )


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("agents", "0007_undrawn_from"),
    ]

    operations = [
        # What needs attention looks for a session's last event of a kind (attention.py).
        AddIndexWithoutBlockingWrites(
            model_name="event",
            index=models.Index(
                fields=["session", "source", "type", "seq"], name="agents_even_session_a9e78c_idx"
            ),
        ),
    ]
