from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "dashboard.agents"
    label = "agents"
    verbose_name = "Agent sessions"

    def ready(self) -> None:
        # Rights taken away close what they opened, however they were taken (admin, shell).
        from dashboard.agents import revocation  # noqa: F401
