"""`manage.py webhooks`: the webhook dispatcher on its own, for deployments that run it apart
from the web workers. Any number may run (with each other and with `serve`'s)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand

from dashboard.awareness.dispatcher import run_forever


class Command(BaseCommand):
    help = "Deliver webhooks until SIGTERM or SIGINT."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--interval", type=float, default=2.0, help="seconds between scans")

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(self._run(options["interval"]))

    async def _run(self, interval: float) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        self.stdout.write("Delivering webhooks (SIGTERM to stop)")
        await run_forever(stop=stop, interval=interval)
