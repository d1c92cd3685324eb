"""The REST half of the API (DESIGN §2): sandboxes, exec sessions and agent sessions."""

from __future__ import annotations

import json
import signal
from dataclasses import asdict
from typing import Any

from . import fields
from .errors import bad_request, conflict
from .processes import ExecSession
from .sandboxes import ExecOptions, Sandbox, SandboxOptions, SandboxRegistry
from .streams import STDERR, STDOUT, Exited
from .web import Request, Response, Router
from .wrappers.protocol import CONFIG_KEYS

DEFAULT_KILL_SIGNAL = signal.SIGKILL
RUN_DEFAULT_TIMEOUT = 60
# exec/run returns output in its response; beyond this much per stream the rest is dropped.
RUN_OUTPUT_LIMIT = 8 * 1024 * 1024
VALID_SIGNALS = {int(sig) for sig in signal.valid_signals()}


class RestApi:
    def __init__(self, registry: SandboxRegistry) -> None:
        self.registry = registry
        self.router = Router()
        self._add_routes()

    def _add_routes(self) -> None:
        add = self.router.add
        # The embedded server's own (the cloud has no such path): Porthole's start page asks.
        add("GET", "/localsandbox", self.describe)
        add("GET", "/sandboxes", self.list_sandboxes)
        add("POST", "/sandboxes", self.create_sandbox)
        add("GET", "/sandboxes/{sandbox_id}", self.get_sandbox)
        add("DELETE", "/sandboxes/{sandbox_id}", self.delete_sandbox)
        add("POST", "/sandboxes/{sandbox_id}/timeout", self.set_timeout)
        add("GET", "/sandboxes/{sandbox_id}/exec", self.list_exec)
        add("POST", "/sandboxes/{sandbox_id}/exec", self.start_exec)
        add("POST", "/sandboxes/{sandbox_id}/exec/run", self.run_exec)
        add("GET", "/sandboxes/{sandbox_id}/exec/{session_id}", self.get_exec)
        add("POST", "/sandboxes/{sandbox_id}/exec/{session_id}/kill", self.kill_exec)
        add("GET", "/sandboxes/{sandbox_id}/agent", self.list_agents)
        add("POST", "/sandboxes/{sandbox_id}/agent", self.start_agent)
        add("GET", "/sandboxes/{sandbox_id}/agent/{session_id}", self.get_agent)
        add("POST", "/sandboxes/{sandbox_id}/agent/{session_id}/prompt", self.prompt_agent)
        add("POST", "/sandboxes/{sandbox_id}/agent/{session_id}/interrupt", self.interrupt_agent)
        add("POST", "/sandboxes/{sandbox_id}/agent/{session_id}/kill", self.kill_agent)

    async def describe(self, request: Request) -> Response:
        status = self.registry.isolation
        return Response(
            200,
            {"server": "porthole-localsandbox", "isolation": asdict(status)},
        )

    def _sandbox(self, request: Request) -> Sandbox:
        return self.registry.get(request.params["sandbox_id"])

    # -- sandboxes -----------------------------------------------------------------------

    async def list_sandboxes(self, request: Request) -> Response:
        return Response(200, [sb.info(request.api_base) for sb in self.registry.all()])

    async def create_sandbox(self, request: Request) -> Response:
        body = request.json()
        options = SandboxOptions(
            template_id=fields.optional_str(body, "templateID") or "base",
            timeout=fields.optional_int(body, "timeout", minimum=0) or 0,
            envs=fields.environment(body, "envs") or {},
            metadata=fields.string_map(body, "metadata") or {},
            cpu_count=fields.optional_int(body, "cpuCount", minimum=1),
            memory_mb=fields.optional_int(body, "memoryMB", minimum=1),
        )
        sandbox = self.registry.create(options)
        return Response(201, sandbox.info(request.api_base))

    async def get_sandbox(self, request: Request) -> Response:
        return Response(200, self._sandbox(request).info(request.api_base))

    async def delete_sandbox(self, request: Request) -> Response:
        await self.registry.delete(request.params["sandbox_id"])
        return Response(204)

    async def set_timeout(self, request: Request) -> Response:
        sandbox = self._sandbox(request)
        timeout = fields.optional_int(request.json(), "timeout", minimum=0)
        if timeout is None:
            raise bad_request("`timeout` is required")
        sandbox.set_timeout(timeout)
        return Response(204)

    # -- exec sessions -------------------------------------------------------------------

    async def list_exec(self, request: Request) -> Response:
        sessions = self._sandbox(request).sessions.values()
        return Response(200, [session.info() for session in sessions])

    async def start_exec(self, request: Request) -> Response:
        sandbox = self._sandbox(request)
        session = await self.registry.start_exec(sandbox, _exec_options(request.json()))
        return Response(201, session.info())

    async def run_exec(self, request: Request) -> Response:
        """Run to completion and return the output: what the SDK's `exec.run` calls."""
        sandbox = self._sandbox(request)
        options = _exec_options(request.json(), default_timeout=RUN_DEFAULT_TIMEOUT)
        session = await self.registry.start_exec(sandbox, options)
        stdout, stderr = await _collect_output(session)
        return Response(
            200,
            {
                "sessionID": session.session_id,
                "exitCode": session.exit_code,
                "stdout": stdout.decode("utf-8", errors="replace"),
                "stderr": stderr.decode("utf-8", errors="replace"),
            },
        )

    async def get_exec(self, request: Request) -> Response:
        return Response(200, self._sandbox(request).session(request.params["session_id"]).info())

    async def kill_exec(self, request: Request) -> Response:
        session = self._sandbox(request).session(request.params["session_id"])
        session.signal(_signal_number(request.json()))
        return Response(204)

    # -- agent sessions ------------------------------------------------------------------

    async def list_agents(self, request: Request) -> Response:
        sessions = self._sandbox(request).sessions.values()
        return Response(200, [s.info() for s in sessions if s.kind == "agent"])

    async def start_agent(self, request: Request) -> Response:
        sandbox = self._sandbox(request)
        body = request.json()
        prompt = fields.optional_str(body, "prompt")
        session = await self.registry.start_agent(sandbox, _agent_options(body), prompt)
        return Response(201, session.info())

    def _agent(self, request: Request) -> ExecSession:
        return self._sandbox(request).session(request.params["session_id"], kind="agent")

    async def get_agent(self, request: Request) -> Response:
        return Response(200, self._agent(request).info())

    async def prompt_agent(self, request: Request) -> Response:
        session = self._agent(request)
        body = request.json()
        line: dict[str, Any] = {"type": "prompt", "text": fields.required_str(body, "text")}
        resume = fields.optional_str(body, "resume")
        if resume:
            line["resume"] = resume
        _write_line(session, line)
        return Response(204)

    async def interrupt_agent(self, request: Request) -> Response:
        _write_line(self._agent(request), {"type": "interrupt"})
        return Response(204)

    async def kill_agent(self, request: Request) -> Response:
        session = self._agent(request)
        session.signal(_signal_number(request.json()))
        return Response(204)


def _exec_options(body: dict[str, Any], default_timeout: float = 0) -> ExecOptions:
    cmd = fields.required_str(body, "cmd")
    if not cmd.strip():
        raise bad_request("`cmd` must not be empty")
    timeout = fields.optional_number(body, "timeout", minimum=0)
    options = ExecOptions(
        cmd=cmd,
        args=fields.string_list(body, "args") or [],
        envs=fields.environment(body, "envs") or {},
        cwd=fields.optional_str(body, "cwd"),
        timeout=default_timeout if timeout is None else timeout,
    )
    for name, value in (("cmd", options.cmd), ("args", options.args), ("cwd", options.cwd)):
        fields.no_nul(value, name)
    return options


def _agent_options(body: dict[str, Any]) -> dict[str, Any]:
    """The wrapper options from an agent-create body, each checked for its JSON type."""
    options: dict[str, Any] = {
        "model": fields.optional_str(body, "model"),
        "systemPrompt": fields.optional_str(body, "systemPrompt"),
        "allowedTools": fields.string_list(body, "allowedTools"),
        "permissionMode": fields.optional_str(body, "permissionMode"),
        "maxTurns": fields.optional_int(body, "maxTurns", minimum=1),
        "cwd": fields.optional_str(body, "cwd"),
        "mcpServers": fields.json_object(body, "mcpServers"),
        "resume": fields.optional_str(body, "resume"),
    }
    assert set(options) == set(CONFIG_KEYS)
    return {key: value for key, value in options.items() if value is not None}


def _signal_number(body: dict[str, Any]) -> int:
    number = fields.optional_int(body, "signal")
    if number is None:
        return DEFAULT_KILL_SIGNAL
    if number not in VALID_SIGNALS:
        raise bad_request(f"`signal` {number} is not a valid signal number")
    return number


def _write_line(session: ExecSession, line: dict[str, Any]) -> None:
    if not session.write_stdin(json.dumps(line).encode() + b"\n"):
        raise conflict(f"session {session.session_id} has exited")


async def _collect_output(session: ExecSession) -> tuple[bytes, bytes]:
    backlog, subscriber = session.hub.subscribe(unbounded=True)
    output = {STDOUT: bytearray(), STDERR: bytearray()}
    try:
        for chunk in backlog:
            output[chunk.stream] += chunk.data
        while not isinstance(item := await subscriber.next(), Exited):
            buffer = output[item.stream]
            buffer += item.data[: max(0, RUN_OUTPUT_LIMIT - len(buffer))]
    finally:
        session.hub.unsubscribe(subscriber)
    return bytes(output[STDOUT][:RUN_OUTPUT_LIMIT]), bytes(output[STDERR][:RUN_OUTPUT_LIMIT])
