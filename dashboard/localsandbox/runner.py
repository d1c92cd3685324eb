"""Running the embedded server: options, safety checks, and Daphne.

    python -m dashboard.localsandbox [--host 127.0.0.1] [--port 8787] [--api-key KEY] ...
    python manage.py localsandbox ...   (the same options)

Programmatic use: `serve(ServerOptions(...))` blocks until SIGTERM/SIGINT (Twisted's reactor
cannot be restarted, so once per process). To mount the API inside another ASGI server
instead, use `server.LocalSandboxApp(server.AppConfig(...))` and await its `shutdown()`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .launch import AGENT_CHOICES, AgentChoice
from .server import DEFAULT_MAX_BODY, AppConfig

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


class ConfigurationError(Exception):
    """The options are unsafe or inconsistent; the message says what to do instead."""


@dataclass(frozen=True)
class ServerOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    data_dir: Path = Path("var/localsandbox")
    agent: AgentChoice = "auto"
    max_body: int = DEFAULT_MAX_BODY


def add_arguments(parser: argparse.ArgumentParser, default_data_dir: Path) -> None:
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="interface to listen on (default 127.0.0.1; others need --api-key)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="TCP port (default 8787; 0 picks a free one)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LOCALSANDBOX_API_KEY") or None,
        help="require this key (X-API-Key / ?api_key=) on every call",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir,
        help=f"where sandbox workspaces live (default {default_data_dir})",
    )
    parser.add_argument(
        "--agent",
        choices=AGENT_CHOICES,
        default="auto",
        help="agent wrapper: claude, demo, or auto (claude when a key is set)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=DEFAULT_MAX_BODY,
        help="largest request body in bytes (default 1 MiB)",
    )


def options_from(namespace: Any) -> ServerOptions:
    options = ServerOptions(
        host=namespace.host,
        port=namespace.port,
        api_key=namespace.api_key or None,
        data_dir=Path(namespace.data_dir),
        agent=namespace.agent,
        max_body=namespace.max_body,
    )
    validate(options)
    return options


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate(options: ServerOptions) -> None:
    if not is_loopback(options.host) and not options.api_key:
        raise ConfigurationError(
            f"refusing to listen on non-loopback host {options.host!r} without --api-key: "
            "anyone who can reach it could run commands on this machine"
        )
    if not 0 <= options.port <= 65535:
        raise ConfigurationError(f"--port {options.port} is not a TCP port")
    if options.max_body < 1:
        raise ConfigurationError("--max-body must be at least 1 byte")


def _bind_address(host: str) -> str:
    return "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")


def api_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/api"


def serve(options: ServerOptions, out: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; every sandbox process is stopped on the way out.

    Prints `localsandbox listening on http://HOST:PORT/api` (flushed) once the socket is
    bound, with the real port when `port` is 0. Returns the process exit status.
    """
    validate(options)
    out = out or sys.stdout
    # Importing daphne.server installs Twisted's asyncio reactor; it must come first.
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server
    from twisted.internet import defer, reactor

    from .server import LocalSandboxApp

    options.data_dir.mkdir(parents=True, exist_ok=True)
    app = LocalSandboxApp(
        AppConfig(
            data_dir=options.data_dir.resolve(),
            api_key=options.api_key,
            agent=options.agent,
            max_body=options.max_body,
        )
    )

    class AnnouncingServer(Server):
        def listen_success(self, port: Any) -> None:
            super().listen_success(port)
            address = port.getHost()
            print(
                f"localsandbox listening on {api_url(address.host, address.port)}",
                file=out,
                flush=True,
            )

    server = AnnouncingServer(
        application=app,
        endpoints=build_endpoint_description_strings(
            host=_bind_address(options.host), port=options.port
        ),
        signal_handlers=True,
        # A stdin frame may be as large as a request body (plus its stream byte).
        websocket_max_message_size=max(options.max_body + 1, 1024 * 1024),
        websocket_max_frame_size=max(options.max_body + 1, 1024 * 1024),
        # Agent sessions run for days; Daphne would otherwise close sockets after 24 h.
        websocket_timeout=-1,
        verbosity=0,
    )
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromFuture(_ensure_future(app.shutdown()))
    )
    try:
        server.run()
    finally:
        app.kill_all_now()  # whatever way the reactor ended, no sandbox process outlives us
    if not server.listening_addresses:
        print(
            f"localsandbox could not listen on {options.host}:{options.port}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def _ensure_future(coroutine: Any) -> Any:
    import asyncio

    return asyncio.ensure_future(coroutine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboard.localsandbox",
        description="Embedded OpenComputer-compatible sandbox server.",
    )
    add_arguments(parser, Path("var/localsandbox"))
    namespace = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("daphne").setLevel(logging.WARNING)
    try:
        options = options_from(namespace)
    except ConfigurationError as exc:
        parser.exit(2, f"error: {exc}\n")
    return serve(options)
