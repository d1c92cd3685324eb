from django.apps import AppConfig


class AwarenessConfig(AppConfig):
    name = "dashboard.awareness"
    label = "awareness"
    verbose_name = "Team awareness"
