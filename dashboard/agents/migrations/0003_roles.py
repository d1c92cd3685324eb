"""The three roles, as Django groups with permissions; `dashboard.agents.roles` names them."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

ROLES = {
    "viewer": [
        "view_agentsession", "view_sandbox", "view_event",
    ],
    "operator": [
        "view_agentsession", "view_sandbox", "view_event",
        "steer_agentsession", "share_agentsession",
    ],
    "admin": [
        "view_agentsession", "view_sandbox", "view_event",
        "steer_agentsession", "share_agentsession",
        "revoke_any_sharelink", "kill_any_sandbox", "manage_people", "view_auditentry",
    ],
}


def create_roles(apps, schema_editor):
    # Permissions are normally created after migrations; roles need them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(
            Permission.objects.filter(content_type__app_label="agents", codename__in=codenames)
        )


def remove_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0002_sharing_presence_audit"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, remove_roles)]
