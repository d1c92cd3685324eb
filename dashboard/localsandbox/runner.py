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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .isolation import TEMPLATES, UNSAFE_SETTING, Template, TemplateError, load_templates
from .launch import AGENT_CHOICES, AgentChoice
from .paths import default_workspaces_dir
from .server import DEFAULT_MAX_BODY, AppConfig

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


class ConfigurationError(Exception):
    """The options are unsafe or inconsistent; the message says what to do instead."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean from the environment, strictly: anything but true/false is an error."""
    raw = (os.environ if environ is None else environ).get(name, "")
    value = raw.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ConfigurationError(f"{name}={raw!r} is not a boolean (use true or false)")


@dataclass(frozen=True)
class ServerOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    workspaces_dir: Path = field(default_factory=default_workspaces_dir)
    agent: AgentChoice = "auto"
    max_body: int = DEFAULT_MAX_BODY
    bwrap: str = "bwrap"
    unsafe_no_isolation: bool = False
    templates: dict[str, Template] = field(default_factory=lambda: dict(TEMPLATES))


@dataclass(frozen=True)
class Defaults:
    """Where the command line's defaults come from (the environment, or Django's settings)."""

    workspaces_dir: Path
    bwrap: str
    unsafe_no_isolation: bool


def defaults_from_environment() -> Defaults:
    return Defaults(
        workspaces_dir=default_workspaces_dir(),
        bwrap=os.environ.get("LOCALSANDBOX_BWRAP") or "bwrap",
        unsafe_no_isolation=env_flag(UNSAFE_SETTING),
    )


def add_arguments(parser: argparse.ArgumentParser, defaults: Defaults) -> None:
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
        "--workspaces-dir",
        type=Path,
        default=defaults.workspaces_dir,
        help=f"where sandbox workspaces live (default {defaults.workspaces_dir}); keep it "
        "apart from Porthole's data directory",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="deprecated and ignored: workspaces live in --workspaces-dir",
    )
    parser.add_argument(
        "--bwrap",
        default=defaults.bwrap,
        help=f"the bubblewrap binary that isolates each sandbox (default {defaults.bwrap})",
    )
    parser.add_argument(
        "--unsafe-no-isolation",
        action="store_true",
        default=defaults.unsafe_no_isolation,
        help=f"where bubblewrap cannot run, run sandbox processes UNISOLATED as this server's "
        f"user instead of refusing them (also {UNSAFE_SETTING}=true)",
    )
    parser.add_argument(
        "--templates",
        type=Path,
        default=os.environ.get("LOCALSANDBOX_TEMPLATES") or None,
        help="a JSON file of sandbox templates (network, limits) added to base and offline "
        "(also LOCALSANDBOX_TEMPLATES)",
    )
    parser.add_argument(
        "--agent",
        "--wrapper",
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
        workspaces_dir=Path(namespace.workspaces_dir),
        agent=namespace.agent,
        max_body=namespace.max_body,
        bwrap=namespace.bwrap,
        unsafe_no_isolation=namespace.unsafe_no_isolation,
        templates=_templates(namespace.templates),
    )
    if namespace.data_dir is not None:
        logger.warning(
            "--data-dir is deprecated and ignored; sandbox workspaces live in %s",
            options.workspaces_dir,
        )
    validate(options)
    return options


def _templates(path: Path | str | None) -> dict[str, Template]:
    if path is None:
        return dict(TEMPLATES)
    try:
        return load_templates(Path(path))
    except TemplateError as exc:
        raise ConfigurationError(str(exc)) from None


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

    options.workspaces_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    app = LocalSandboxApp(
        AppConfig(
            workspaces_dir=options.workspaces_dir.resolve(),
            api_key=options.api_key,
            agent=options.agent,
            max_body=options.max_body,
            bwrap=options.bwrap,
            unsafe_no_isolation=options.unsafe_no_isolation,
            templates=options.templates,
        )
    )
    # Said on stdout, unmissably, before the listening line (`manage.py serve` echoes both).
    print(f"localsandbox isolation: {app.isolation.detail}", file=out, flush=True)
    print(f"localsandbox workspaces in {app.config.workspaces_dir}", file=out, flush=True)
    if not options.api_key:
        print(
            "localsandbox WARNING: no --api-key, so any process on this machine can use this "
            "API, sandboxes with network included, and through it reach every other sandbox",
            file=out,
            flush=True,
        )

    class AnnouncingServer(Server):  # type: ignore[misc]
        def listen_success(self, port: Any) -> None:
            super().listen_success(port)
            address = port.getHost()
            print(
                f"localsandbox listening on {api_url(address.host, address.port)} "
                f"(isolation: {app.isolation.mode})",
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
    # Twisted's interface declares its methods without `self`, which shifts mypy's view by one.
    reactor.addSystemEventTrigger(
        "before",
        "shutdown",  # type: ignore[arg-type]
        lambda: defer.Deferred.fromFuture(_ensure_future(app.shutdown())),
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
    try:
        defaults = defaults_from_environment()
    except ConfigurationError as exc:
        parser.exit(2, f"error: {exc}\n")
    add_arguments(parser, defaults)
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
