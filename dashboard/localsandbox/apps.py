from django.apps import AppConfig


class LocalSandboxConfig(AppConfig):
    """Only here so `manage.py localsandbox` exists; the server itself needs no Django."""

    name = "dashboard.localsandbox"
    label = "localsandbox"
    verbose_name = "Embedded sandbox server"
