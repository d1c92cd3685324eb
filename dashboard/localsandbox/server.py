"""The embedded OpenComputer-compatible API as a plain ASGI application.

Everything lives under `/api`. Credentials, when the server has an API key: the key itself
(`X-API-Key` header or `?api_key=`), or a sandbox's own token (`Authorization: Bearer` or
`?token=`) for calls under that sandbox. Without an API key (loopback only) nothing is asked.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from dashboard.daphne_glue import reject_websocket

from . import isolation, launch
from .attach import serve_attachment
from .errors import ApiError, not_found
from .processes import ExecSession, SessionKind
from .rest import RestApi
from .sandboxes import Sandbox, SandboxRegistry
from .web import (
    Receive,
    Request,
    Response,
    Scope,
    Send,
    error_response,
    header_map,
    query_map,
    read_body,
    send_response,
)

logger = logging.getLogger(__name__)

API_PREFIX = "/api"
DEFAULT_MAX_BODY = 1024 * 1024
_SANDBOX_IN_PATH = re.compile(r"^/sandboxes/([^/]+)")
_STREAM_PATH = re.compile(
    r"^/sandboxes/(?P<sandbox_id>[^/]+)/(?P<kind>exec|agent)/(?P<session_id>[^/]+)$"
)


@dataclass(frozen=True)
class AppConfig:
    workspaces_dir: Path
    api_key: str | None = None
    agent: launch.AgentChoice = "auto"
    max_body: int = DEFAULT_MAX_BODY
    bwrap: str = "bwrap"
    templates: dict[str, isolation.Template] = field(
        default_factory=lambda: dict(isolation.TEMPLATES)
    )
    # Run sandbox processes unisolated, on the host, when bubblewrap cannot run. Never default.
    unsafe_no_isolation: bool = False


class LocalSandboxApp:
    """ASGI entry point: `LocalSandboxApp(config)` is the application object."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.isolation = isolation.probe(
            config.bwrap, unsafe_no_isolation=config.unsafe_no_isolation
        )
        # The runner says it on stdout already; a missing isolation is worth a warning too.
        log = logger.debug if self.isolation.mode == "bubblewrap" else logger.warning
        log("isolation: %s", self.isolation.detail)
        self.registry = SandboxRegistry(
            config.workspaces_dir,
            config.agent,
            isolation_status=self.isolation,
            bwrap=config.bwrap,
            templates=config.templates,
        )
        self.rest = RestApi(self.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def shutdown(self) -> None:
        """Stop every sandbox process (SIGTERM, then SIGKILL after a grace period)."""
        await self.registry.shutdown()

    def kill_all_now(self) -> None:
        self.registry.kill_all_now()

    # -- HTTP ----------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        try:
            path = _api_path(scope)
            self._authorize(path, headers, query_map(scope))
            handler, params = self.rest.router.resolve(scope["method"], path)
            body = await read_body(receive, headers, self.config.max_body)
            request = Request(
                scope["method"], path, headers, body, params, _api_base(scope, headers)
            )
            sandbox = self._sandbox_in(path)
            try:
                response = await handler(request)
            finally:
                # Every call that touches a sandbox restarts its idle clock, before and after
                # (a long exec/run must not count as idle time).
                if sandbox is not None:
                    sandbox.touch()
        except ApiError as exc:
            response = error_response(exc)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            response = Response(500, {"error": "internal server error"})
        await send_response(send, response)

    # -- WebSocket -----------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            sandbox, session = self._stream_target(scope)
        except ApiError as exc:
            await reject_websocket(send, exc.status, exc.message)
            return
        await send({"type": "websocket.accept"})
        try:
            await serve_attachment(sandbox, session, receive, send)
        except Exception:
            # Logged here; the client gets a plain "internal error" close, no details.
            logger.exception("stream %s failed", scope["path"])
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})

    def _stream_target(self, scope: Scope) -> tuple[Sandbox, ExecSession]:
        path = _api_path(scope)
        self._authorize(path, header_map(scope), query_map(scope))
        match = _STREAM_PATH.match(path)
        if match is None:
            raise not_found(f"no such stream endpoint: {path}")
        sandbox = self.registry.get(match["sandbox_id"])
        kind: SessionKind | None = "agent" if match["kind"] == "agent" else None
        return sandbox, sandbox.session(match["session_id"], kind=kind)

    # -- shared --------------------------------------------------------------------------

    def _sandbox_in(self, path: str) -> Sandbox | None:
        match = _SANDBOX_IN_PATH.match(path)
        return self.registry.find(match.group(1)) if match else None

    def _authorize(self, path: str, headers: dict[str, str], query: dict[str, str]) -> None:
        api_key = self.config.api_key
        if not api_key:
            return
        supplied_key = headers.get("x-api-key") or query.get("api_key")
        if supplied_key and hmac.compare_digest(supplied_key.encode(), api_key.encode()):
            return
        token = _bearer(headers.get("authorization", "")) or query.get("token")
        sandbox = self._sandbox_in(path)
        if token and sandbox and hmac.compare_digest(token.encode(), sandbox.token.encode()):
            return
        raise ApiError(401, "missing or invalid credentials", {"WWW-Authenticate": "Bearer"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _api_path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
        raise not_found(f"no such endpoint: {path}")
    return path[len(API_PREFIX) :].rstrip("/") or "/"


def _api_base(scope: Scope, headers: dict[str, str]) -> str:
    """This server's API base as the client reached it: what `connectURL` must be."""
    host = headers.get("host")
    if not host:
        server_host, server_port = scope.get("server") or ("127.0.0.1", 80)
        host = (
            f"[{server_host}]:{server_port}"
            if ":" in server_host
            else f"{server_host}:{server_port}"
        )
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}{API_PREFIX}"


def _bearer(authorization: str) -> str | None:
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None
