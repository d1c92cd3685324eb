"""The REST client: sandboxes, agent sessions and exec sessions, plus opening exec streams.

It speaks what the official ``opencomputer-sdk`` 1.x speaks on the wire: base URL
``<api_url>/api`` (appended when missing), ``X-API-Key`` on every call, camelCase JSON
bodies with only the keys that are set, and ``x-oc-sdk-version`` on sandbox creation (the
cloud routes an un-pinned organisation's creates by that version). Exec streams use the
TypeScript SDK's habit: ``<api as ws(s)>/sandboxes/{id}/exec/{sid}?api_key=<key>``.

Why one module of over 400 lines: every call shares the request envelope, the error
mapping and the key redaction; split by resource, each part would repeat them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
from websockets.asyncio.client import connect as ws_connect

from .errors import ConnectionFailed, ProtocolError, error_from_response
from .models import AgentSessionInfo, ExecSessionInfo, SandboxInfo
from .stream import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConnectFunction,
    ExecStream,
    StreamOpener,
    connect_stream,
    stream_url,
)

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_TIMEOUT",
    "SDK_COMPAT_VERSION",
    "OpenComputer",
    "api_base",
    "configure_line",
]

DEFAULT_API_URL = "https://app.opencomputer.dev"

#: Connect fast, and give a call (sandbox creation included) 30 s like the SDK does.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

#: The official SDK version whose wire behaviour this client matches; sent as
#: ``x-oc-sdk-version`` on sandbox creation so the cloud picks the same runtime for us.
SDK_COMPAT_VERSION = "1.1.0"
SDK_VERSION_HEADER = "x-oc-sdk-version"


def api_base(api_url: str) -> str:
    """The control-plane base: ``api_url`` minus a trailing slash, ``/api`` appended if missing."""
    url = api_url.rstrip("/")
    return url if url.endswith("/api") else f"{url}/api"


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return quote(value, safe="")


class OpenComputer:
    """An async OpenComputer API client sharing one ``httpx.AsyncClient``.

    Pass ``http`` to share a client you own (it is then not closed by :meth:`aclose`); the
    base URL and the API key are applied per request either way. ``ws_url`` overrides the
    WebSocket base (default: the API base with ``http`` → ``ws``), e.g. to go through a proxy.
    """

    def __init__(
        self,
        api_url: str,
        api_key: str = "",
        *,
        http: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        ws_url: str | None = None,
        ws_open_timeout: float | None = 10.0,
        ws_max_size: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        ws_connect: ConnectFunction = ws_connect,
        sdk_version: str | None = SDK_COMPAT_VERSION,
    ) -> None:
        self.api_base = api_base(api_url)
        self.ws_base = ws_url.rstrip("/") if ws_url else self.api_base
        self._api_key = api_key
        self._headers: dict[str, str] = {"X-API-Key": api_key} if api_key else {}
        self._sdk_version = sdk_version
        self._ws_open_timeout = ws_open_timeout
        self._ws_max_size = ws_max_size
        self._ws_connect = ws_connect
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            base_url=self.api_base, headers=self._headers, timeout=timeout
        )

    @classmethod
    def from_env(cls, **kwargs: Any) -> Self:
        """Read ``OPENCOMPUTER_API_URL`` (default the cloud) and ``OPENCOMPUTER_API_KEY``."""
        return cls(
            os.environ.get("OPENCOMPUTER_API_URL") or DEFAULT_API_URL,
            os.environ.get("OPENCOMPUTER_API_KEY", ""),
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"<OpenComputer {self.api_base}>"

    @property
    def api_url(self) -> str:
        """The normalised control-plane base (same as ``api_base``: ends in ``/api``)."""
        return self.api_base

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- transport ---------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        url = self.api_base + path
        all_headers = {**self._headers, **(headers or {})}
        try:
            response = await self._http.request(method, url, json=body, headers=all_headers)
        except httpx.TimeoutException as exc:
            raise ConnectionFailed(
                f"timed out ({type(exc).__name__})", method=method, url=url
            ) from exc
        except httpx.HTTPError as exc:
            detail = str(exc) or type(exc).__name__
            raise ConnectionFailed(detail, method=method, url=url) from exc
        if not response.is_success:
            raise error_from_response(
                response.status_code,
                response.content,
                reason=response.reason_phrase,
                method=method,
                url=url,
                retry_after=response.headers.get("retry-after"),
                secrets=(self._api_key,),
            )
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ProtocolError(
                "response is not JSON",
                status=response.status_code,
                method=method,
                url=self.api_base + path,
            ) from None

    async def _json_list(self, path: str) -> list[Any]:
        data = await self._json("GET", path)
        if not isinstance(data, list):
            raise ProtocolError(
                f"expected a JSON array, got {type(data).__name__}",
                method="GET",
                url=self.api_base + path,
            )
        return data

    # -- sandboxes ---------------------------------------------------------------------

    async def create_sandbox(
        self,
        template: str = "base",
        timeout: int = 0,
        envs: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        cpu_count: int | None = None,
        memory_mb: int | None = None,
    ) -> SandboxInfo:
        """Create a sandbox. ``timeout`` is the idle timeout in seconds (0 = persistent)."""
        body: dict[str, Any] = {"templateID": template, "timeout": timeout}
        if envs is not None:
            body["envs"] = dict(envs)
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if cpu_count is not None:
            body["cpuCount"] = cpu_count
        if memory_mb is not None:
            body["memoryMB"] = memory_mb
        headers = {SDK_VERSION_HEADER: self._sdk_version} if self._sdk_version else None
        return SandboxInfo.from_json(
            await self._json("POST", "/sandboxes", body=body, headers=headers)
        )

    async def list_sandboxes(self) -> list[SandboxInfo]:
        return [SandboxInfo.from_json(item) for item in await self._json_list("/sandboxes")]

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        path = f"/sandboxes/{_segment(sandbox_id, 'sandbox_id')}"
        return SandboxInfo.from_json(await self._json("GET", path))

    async def kill_sandbox(self, sandbox_id: str) -> None:
        await self._request("DELETE", f"/sandboxes/{_segment(sandbox_id, 'sandbox_id')}")

    # -- agent sessions ----------------------------------------------------------------

    def _agent_path(self, sandbox_id: str, session_id: str | None = None) -> str:
        path = f"/sandboxes/{_segment(sandbox_id, 'sandbox_id')}/agent"
        if session_id is not None:
            path += f"/{_segment(session_id, 'session_id')}"
        return path

    async def start_agent(
        self,
        sandbox_id: str,
        *,
        prompt: str | None,
        model: str | None = None,
        system_prompt: str | None = None,
        allowed_tools: Sequence[str] | None = None,
        permission_mode: str | None = None,
        max_turns: int | None = None,
        cwd: str | None = None,
        mcp_servers: Mapping[str, Any] | None = None,
        resume: str | None = None,
    ) -> AgentSessionInfo:
        """Start an agent session; ``prompt`` (if any) is its first turn.

        Options left at ``None`` (or empty strings) are not sent, so the wrapper's defaults
        apply. ``allowed_tools=[]`` is sent as an empty list.
        """
        body: dict[str, Any] = {"prompt": prompt} if prompt else {}
        body |= configure_line(
            model=model,
            system_prompt=system_prompt,
            allowed_tools=allowed_tools,
            permission_mode=permission_mode,
            max_turns=max_turns,
            cwd=cwd,
            mcp_servers=mcp_servers,
            resume=resume,
        )
        del body["type"]
        data = await self._json("POST", self._agent_path(sandbox_id), body=body)
        return AgentSessionInfo.from_json(data, sandbox_id=sandbox_id)

    async def list_agents(self, sandbox_id: str) -> list[AgentSessionInfo]:
        items = await self._json_list(self._agent_path(sandbox_id))
        return [AgentSessionInfo.from_json(item, sandbox_id=sandbox_id) for item in items]

    async def send_prompt(self, sandbox_id: str, session_id: str, text: str) -> None:
        """Start the next turn with ``text``."""
        path = self._agent_path(sandbox_id, session_id) + "/prompt"
        await self._request("POST", path, body={"text": text})

    async def interrupt(self, sandbox_id: str, session_id: str) -> None:
        """Interrupt the current turn; the session stays alive (stdout says ``interrupted``)."""
        await self._request("POST", self._agent_path(sandbox_id, session_id) + "/interrupt")

    async def kill_agent(self, sandbox_id: str, session_id: str, signal: int = 9) -> None:
        """Signal the agent process (default SIGKILL); its stream then ends with ``Exit``."""
        path = self._agent_path(sandbox_id, session_id) + "/kill"
        await self._request("POST", path, body={"signal": signal})

    # -- exec sessions -----------------------------------------------------------------

    def _exec_path(self, sandbox_id: str, session_id: str | None = None) -> str:
        path = f"/sandboxes/{_segment(sandbox_id, 'sandbox_id')}/exec"
        if session_id is not None:
            path += f"/{_segment(session_id, 'session_id')}"
        return path

    async def list_exec(self, sandbox_id: str) -> list[ExecSessionInfo]:
        """Every exec session of the sandbox (agent sessions included: they are exec sessions)."""
        items = await self._json_list(self._exec_path(sandbox_id))
        return [ExecSessionInfo.from_json(item, sandbox_id=sandbox_id) for item in items]

    async def start_exec(
        self,
        sandbox_id: str,
        cmd: str,
        args: Sequence[str] | None = None,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: int | None = None,
        max_run_after_disconnect: int | None = None,
    ) -> ExecSessionInfo:
        """Start ``cmd args...`` as an exec session (not attached: use :meth:`open_stream`)."""
        body: dict[str, Any] = {"cmd": cmd}
        if args is not None:
            body["args"] = list(args)
        if envs is not None:
            body["envs"] = dict(envs)
        if cwd:
            body["cwd"] = cwd
        if timeout is not None:
            body["timeout"] = timeout
        if max_run_after_disconnect is not None:
            body["maxRunAfterDisconnect"] = max_run_after_disconnect
        data = await self._json("POST", self._exec_path(sandbox_id), body=body)
        info = ExecSessionInfo.from_json(data, sandbox_id=sandbox_id)
        if not info.command:  # the SDK only relies on sessionID; fill in what we sent
            return ExecSessionInfo(
                session_id=info.session_id,
                sandbox_id=info.sandbox_id,
                command=cmd,
                args=tuple(args or ()),
                running=info.running,
                exit_code=info.exit_code,
                started_at=info.started_at,
                attached_clients=info.attached_clients,
                truncated=info.truncated,
                raw=info.raw,
            )
        return info

    async def kill_exec(self, sandbox_id: str, session_id: str, signal: int = 9) -> None:
        path = self._exec_path(sandbox_id, session_id) + "/kill"
        await self._request("POST", path, body={"signal": signal})

    # -- streams -----------------------------------------------------------------------

    def stream_url(self, sandbox_id: str, session_id: str, *, kind: str = "exec") -> str:
        """The exec WebSocket URL, **including the API key**. Never show or log it."""
        return stream_url(self.ws_base, sandbox_id, session_id, api_key=self._api_key, kind=kind)

    def open_stream(
        self,
        sandbox_id: str,
        session_id: str,
        *,
        kind: str = "exec",
        url: str | None = None,
        **options: Any,
    ) -> StreamOpener:
        """Attach to a session's output: ``await`` it, or ``async with`` it.

        ``url`` replaces the computed URL entirely (it must carry its own credentials);
        ``options`` go to the WebSocket connect function.
        """
        target = url if url is not None else self.stream_url(sandbox_id, session_id, kind=kind)
        options.setdefault("open_timeout", self._ws_open_timeout)
        options.setdefault("max_size", self._ws_max_size)
        options.setdefault("connect", self._ws_connect)

        async def factory() -> ExecStream:
            return await connect_stream(
                target,
                secrets=(self._api_key,),
                sandbox_id=sandbox_id,
                session_id=session_id,
                **options,
            )

        return StreamOpener(factory)

    async def write_stdin(
        self, sandbox_id: str, session_id: str, data: bytes | str, *, url: str | None = None
    ) -> None:
        """Write to a session's stdin over a short-lived stream (there is no REST call for it).

        The connection replays the scrollback, which is ignored; the process keeps running.
        """
        async with self.open_stream(sandbox_id, session_id, url=url) as stream:
            await stream.send_stdin(data)

    async def configure(
        self,
        sandbox_id: str,
        session_id: str,
        *,
        model: str | None = None,
        system_prompt: str | None = None,
        allowed_tools: Sequence[str] | None = None,
        permission_mode: str | None = None,
        max_turns: int | None = None,
        cwd: str | None = None,
        mcp_servers: Mapping[str, Any] | None = None,
        resume: str | None = None,
        url: str | None = None,
    ) -> None:
        """Send the wrapper a ``configure`` line (applies from the next turn)."""
        line = configure_line(
            model=model,
            system_prompt=system_prompt,
            allowed_tools=allowed_tools,
            permission_mode=permission_mode,
            max_turns=max_turns,
            cwd=cwd,
            mcp_servers=mcp_servers,
            resume=resume,
        )
        async with self.open_stream(sandbox_id, session_id, url=url) as stream:
            await stream.send_line(line)


def configure_line(
    *,
    model: str | None = None,
    system_prompt: str | None = None,
    allowed_tools: Sequence[str] | None = None,
    permission_mode: str | None = None,
    max_turns: int | None = None,
    cwd: str | None = None,
    mcp_servers: Mapping[str, Any] | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """The wrapper's ``{"type": "configure", ...}`` stdin object with only the set keys."""
    line: dict[str, Any] = {"type": "configure"}
    for key, value in (
        ("model", model),
        ("systemPrompt", system_prompt),
        ("permissionMode", permission_mode),
        ("cwd", cwd),
        ("resume", resume),
    ):
        if value:
            line[key] = value
    if allowed_tools is not None:
        line["allowedTools"] = list(allowed_tools)
    if max_turns is not None:
        line["maxTurns"] = max_turns
    if mcp_servers is not None:
        line["mcpServers"] = dict(mcp_servers)
    return line
