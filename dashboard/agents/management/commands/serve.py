"""`manage.py serve`: run Porthole (uvicorn) with its bridge supervisor in the same loop.

Web workers can also run as plain `uvicorn` (`dashboard.webserver.command_line`) with the
bridges in `manage.py bridges`; `serve` does both for one machine.

With no `OPENCOMPUTER_API_URL`, it first starts the embedded sandbox server as a child
process on loopback with a fresh API key, and points Porthole at it: one command, no
account, no network. The bridges run in this process so that, with the in-memory channel
layer, the fragments they publish reach this process's viewers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from dashboard.agents.management import require_migrated

LISTENING = re.compile(r"listening on (http://\S+)")


class Command(BaseCommand):
    help = "Run Porthole (and, unless OPENCOMPUTER_API_URL is set, the embedded sandbox server)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=settings.PORTHOLE_HOST)
        parser.add_argument("--port", type=int, default=settings.PORTHOLE_PORT)
        parser.add_argument(
            "--sandbox-port",
            type=int,
            default=settings.LOCALSANDBOX_PORT,
            help="port of the embedded sandbox server (0 picks a free one)",
        )
        parser.add_argument(
            "--agent",
            default=settings.LOCALSANDBOX_AGENT,
            choices=["auto", "claude", "demo"],
            help="the embedded server's agent",
        )
        parser.add_argument("--no-bridges", action="store_true", help="do not run bridges here")

    def handle(self, *args: Any, **options: Any) -> None:
        require_migrated()
        child = None
        if not settings.OPENCOMPUTER_API_URL:
            child = self._start_localsandbox(options["sandbox_port"], options["agent"])
        try:
            self._serve(options)
        finally:
            # Whatever ended this (a signal, an error before serving), the embedded sandbox
            # server goes with it: left behind, it would keep its port and its sandboxes.
            if child is not None:
                child.terminate()
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()

    def _serve(self, options: dict[str, Any]) -> None:
        import uvicorn

        from dashboard.agents.supervisor import BridgeSupervisor, worker_id
        from dashboard.asgi import application
        from dashboard.awareness.dispatcher import run_forever as run_webhooks
        from dashboard.webserver import uvicorn_config

        # A stable identity (host and port): restarted, this worker claims its own
        # sessions back at once instead of waiting for their leases to lapse.
        owner = worker_id(f"{socket.gethostname()}:serve:{options['port']}")
        supervisor = (
            BridgeSupervisor(owner)
            if settings.PORTHOLE_RUN_BRIDGES and not options["no_bridges"]
            else None
        )
        if supervisor is None:
            self.stdout.write(
                "Not running bridges here: run `manage.py bridges` beside this process, "
                "or started sessions will not be recorded."
            )
        host, port = options["host"], options["port"]
        self.host, self.port = host, port
        server = uvicorn.Server(uvicorn_config(application, host.strip("[]"), port))

        async def run() -> None:
            background = []
            if supervisor is not None:
                background.append(asyncio.create_task(supervisor.run(), name="bridge-supervisor"))
                # One machine, one command: webhooks go out from here too (several workers
                # may each run a dispatcher; deliveries stay at most once per event).
                background.append(asyncio.create_task(run_webhooks(), name="webhooks"))
            try:
                await server.serve()
            finally:
                if supervisor is not None:
                    with contextlib.suppress(Exception):
                        await supervisor.stop()
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

        self.stdout.write(
            f"Porthole on http://{host}:{port}/  (API: {settings.OPENCOMPUTER_API_URL})"
        )
        self._first_run_hint()
        # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again
        # to the handlers it found: these, so that the bridges and the embedded sandbox
        # server are stopped below rather than the process ended on the spot.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, frame: None)
        asyncio.run(run())

    def _start_localsandbox(self, port: int, agent: str) -> subprocess.Popen[str]:
        key = secrets.token_urlsafe(24)
        command = [
            sys.executable,
            str(Path(settings.BASE_DIR) / "manage.py"),
            "localsandbox",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--agent",
            agent,
        ]
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # In the environment, not the command line: any process can read command lines.
            env=dict(os.environ, PYTHONUNBUFFERED="1", LOCALSANDBOX_API_KEY=key),
        )
        url = _wait_for_listening(child, timeout=30)
        if url is None:
            child.kill()
            raise CommandError("The embedded sandbox server did not start (see its output above).")
        settings.OPENCOMPUTER_API_URL = url
        settings.OPENCOMPUTER_API_KEY = key
        self.stdout.write(f"Embedded sandbox server on {url} (agent: {agent})")
        return child

    def _first_run_hint(self) -> None:
        if get_user_model().objects.exists():
            return
        from dashboard.agents.access import setup_token

        token = setup_token(settings.DATA_DIR)
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        self.stdout.write(
            "No users yet. Create the administrator at "
            f"http://{host}:{self.port}/setup/?token={token} "
            "(or run `manage.py createsuperuser`)."
        )


def _wait_for_listening(child: subprocess.Popen[str], timeout: float) -> str | None:
    """Echo the child's output; return its API URL once it says it is listening."""
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(f"[localsandbox] {line}")
            match = LISTENING.search(line)
            if match and not found.is_set():
                url.append(match.group(1).rstrip("/"))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True, name="localsandbox-output").start()
    found.wait(timeout)
    return url[0] if url else None
