"""Index sessions recorded before the search index existed (or rebuild it)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from dashboard.agents.models import AgentSession
from dashboard.search.index import reindex


class Command(BaseCommand):
    help = "Rebuild the full-text search index of every session (or of the given ones)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("sessions", nargs="*", help="session ids (default: all)")

    def handle(self, *args: Any, **options: Any) -> None:
        sessions = AgentSession.objects.order_by("started_at")
        if options["sessions"]:
            sessions = sessions.filter(id__in=options["sessions"])
        written = reindex(sessions)
        self.stdout.write(f"Indexed {written} entries from {sessions.count()} sessions.")
