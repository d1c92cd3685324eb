from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0005_bridge_workers"),
    ]

    operations = [
        # Nullable and without a default: a plain ADD COLUMN on both databases, whatever the
        # size of the events table (SQLite would copy the table for a default).
        migrations.AddField(
            model_name="event",
            name="html",
            field=models.TextField(blank=True, null=True),
        ),
    ]
