from django.apps import AppConfig


class AwarenessConfig(AppConfig):
    name = "dashboard.awareness"
    label = "awareness"
    verbose_name = "Team awareness"

    def ready(self) -> None:
        from dashboard.awareness import checks  # noqa: F401 (registers the checks)
