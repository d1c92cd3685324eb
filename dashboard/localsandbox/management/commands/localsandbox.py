"""`manage.py localsandbox`: the embedded sandbox server, with the project's data directory."""

from __future__ import annotations

import argparse
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from dashboard.localsandbox.runner import (
    ConfigurationError,
    Defaults,
    add_arguments,
    options_from,
    serve,
)


class Command(BaseCommand):
    help = "Run the embedded OpenComputer-compatible sandbox server (API under /api)."
    # The server uses no Django machinery; the project's checks (URLs, models) are not its
    # business and must not stop it from starting.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(
            parser,
            Defaults(
                workspaces_dir=settings.LOCALSANDBOX_WORKSPACES_DIR,
                bwrap=settings.LOCALSANDBOX_BWRAP,
                unsafe_no_isolation=settings.LOCALSANDBOX_UNSAFE_NO_ISOLATION,
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            server_options = options_from(argparse.Namespace(**options))
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        status = serve(server_options)
        if status:
            raise CommandError("localsandbox stopped with an error", returncode=status)
