from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0006_event_html"),
    ]

    operations = [
        # Nullable, no default: a plain ADD COLUMN; null (everything drawn) is what every
        # session recorded before it is.
        migrations.AddField(
            model_name="agentsession",
            name="undrawn_from",
            field=models.PositiveBigIntegerField(blank=True, null=True),
        ),
    ]
