"""`manage.py bridges`: run bridge supervision only, without HTTP.

For deployments that serve the web side with plain uvicorn workers
(`dashboard.webserver.command_line`): run one or more of these beside them (each with its
own `--worker-id`, stable across restarts, so a restarted worker takes its own sessions back
at once). SIGTERM or SIGINT stops cleanly: each bridge releases its lease so another worker
can claim it at once. With PORTHOLE_METRICS_PORT set, its metrics (what it records, its
leases, its upstream reconnects) are served on that loopback port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from dashboard.agents.management import require_migrated
from dashboard.agents.supervisor import BridgeSupervisor, worker_id
from dashboard.heap import freeze_startup_heap
from dashboard.ops import start_metrics_server

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Run bridge supervision (recording of live sessions) without serving HTTP."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--worker-id",
            default="",
            help="this worker's name, stable across restarts (default: PORTHOLE_WORKER_ID, "
            "else host:bridges)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        require_migrated()
        owner = options["worker_id"] or worker_id(f"{socket.gethostname()}:bridges")
        try:
            serving = start_metrics_server()
        except OSError as exc:  # the port is taken, most likely
            raise CommandError(f"PORTHOLE_METRICS_PORT: {exc}") from exc
        # Logged, not printed: a daemon's lines go where LOG_FORMAT says, like the rest.
        if serving:
            log.info("Metrics on http://127.0.0.1:%s/", settings.PORTHOLE_METRICS_PORT)
        freeze_startup_heap()  # full collections would walk start-up's objects (dashboard.heap)
        log.info("Bridges worker %s supervising live sessions", owner)
        asyncio.run(_run(owner))


async def _run(owner: str) -> None:
    supervisor = BridgeSupervisor(owner)
    task = asyncio.create_task(supervisor.run(), name="bridge-supervisor")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("bridges worker %s stopped; leases released", owner)
