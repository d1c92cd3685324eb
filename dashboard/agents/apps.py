from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "dashboard.agents"
    label = "agents"
    verbose_name = "Agent sessions"

    def ready(self) -> None:
        # Rights taken away close what they opened, however they were taken (admin, shell).
        # A correct sign-in clears that person's failed ones (and nobody else's).
        from dashboard.agents import (
            people,  # noqa: F401
            revocation,  # noqa: F401
        )
