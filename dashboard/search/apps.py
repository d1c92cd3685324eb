from django.apps import AppConfig


class SearchConfig(AppConfig):
    name = "dashboard.search"
    label = "search"
    verbose_name = "Full-text search"
