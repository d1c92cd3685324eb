"""Sandboxes: a workspace directory, an environment and the sessions running in it.

Each session's process runs in a bubblewrap container of the sandbox (isolation.py) that sees
the workspace at /workspace and nothing of the host's but the system's read-only files. Only
when the operator opted out of isolation do processes run directly on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from . import isolation, launch
from .errors import ApiError, bad_request, conflict, not_found
from .processes import ExecSession, Jail, ProcessSpec, SessionKind, SpawnError
from .timeutil import utc_now_iso

logger = logging.getLogger(__name__)

DEFAULT_PATH = isolation.SANDBOX_PATH
# Where the workspace appears inside a sandbox's container.
WORKSPACE_IN_SANDBOX = isolation.WORKSPACE
# How long a DELETE waits for killed processes to be gone before answering anyway.
DELETE_WAIT_SECONDS = 5.0

SandboxStatus = Literal["running", "stopped"]


@dataclass(frozen=True)
class SandboxOptions:
    template_id: str = "base"
    timeout: int = 0  # idle seconds before the sandbox stops; 0 = never
    envs: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    cpu_count: int | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class ExecOptions:
    cmd: str
    args: list[str] = field(default_factory=list)
    envs: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float = 0  # seconds before the process is killed; 0 = no limit


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class Sandbox:
    def __init__(
        self,
        sandbox_id: str,
        options: SandboxOptions,
        confinement: isolation.Confinement,
        agent: launch.AgentName,
        jail: Jail | None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.options = options
        self.confinement = confinement
        self.workspace = confinement.workspace  # on the host
        self.agent = agent
        self.jail = jail
        # Accepted as a bearer credential for this sandbox's calls (the Python SDK uses it).
        self.token = secrets.token_hex(32)
        self.started_at = utc_now_iso()
        self.status: SandboxStatus = "running"
        self.timeout = options.timeout
        self.sessions: dict[str, ExecSession] = {}
        self._loop = asyncio.get_running_loop()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.touch()

    def info(self, connect_url: str) -> dict[str, Any]:
        """What create/get/list return. `envs` is left out: it may hold secrets."""
        return {
            "sandboxID": self.sandbox_id,
            "status": self.status,
            "templateID": self.options.template_id,
            "startedAt": self.started_at,
            "endAt": None,
            "timeout": self.timeout,
            "metadata": {**self.options.metadata, "agent": self.agent},
            "cpuCount": self.options.cpu_count,
            "memoryMB": self.options.memory_mb,
            "connectURL": connect_url,
            "token": self.token,
        }

    @property
    def attached_clients(self) -> int:
        return sum(session.attached_clients for session in self.sessions.values())

    def session(self, session_id: str, kind: SessionKind | None = None) -> ExecSession:
        session = self.sessions.get(session_id)
        if session is None or (kind is not None and session.kind != kind):
            noun = "agent session" if kind == "agent" else "session"
            raise not_found(f"{noun} {session_id} not found in sandbox {self.sandbox_id}")
        return session

    def require_running(self) -> None:
        if self.status != "running":
            raise conflict(f"sandbox {self.sandbox_id} is {self.status}")

    # -- idle timeout --------------------------------------------------------------------

    def touch(self) -> None:
        """Something used the sandbox: the idle clock starts again."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.timeout > 0 and self.status == "running":
            self._idle_timer = self._loop.call_later(self.timeout, self._idle_expired)

    def set_timeout(self, timeout: int) -> None:
        self.timeout = timeout
        self.touch()

    def _idle_expired(self) -> None:
        self._idle_timer = None
        # An attached client keeps the sandbox alive; its detach touches the sandbox again.
        if self.attached_clients == 0:
            logger.info("sandbox %s idle for %d s: stopping it", self.sandbox_id, self.timeout)
            self.stop()

    # -- processes -----------------------------------------------------------------------

    @property
    def home(self) -> str:
        """The workspace as the sandbox's processes see it."""
        return WORKSPACE_IN_SANDBOX if self.jail else str(self.workspace)

    def process_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """Only what the sandbox was given, on top of a plain PATH, HOME and LANG."""
        env = {"PATH": DEFAULT_PATH, "HOME": self.home, "LANG": "C.UTF-8"}
        env.update(self.options.envs)
        env.update(extra)
        return env

    def resolve_cwd(self, cwd: str | None) -> str:
        """`cwd` (relative to the workspace, or absolute as the sandbox sees it) as the process
        sees it; it must be a directory inside the workspace."""
        if cwd and self.jail and (cwd == WORKSPACE_IN_SANDBOX or cwd.startswith("/workspace/")):
            cwd = cwd.removeprefix(WORKSPACE_IN_SANDBOX).lstrip("/")
        path = self.workspace if not cwd else self.workspace / cwd  # absolute cwd wins the join
        if not self.jail:
            if not path.is_dir():
                raise bad_request(f"cwd {cwd!r} is not a directory in the sandbox")
            return str(path)
        try:
            inside = path.resolve().relative_to(self.workspace.resolve())
        except (ValueError, OSError):
            raise bad_request(f"cwd {cwd!r} is not inside the sandbox's workspace") from None
        if not path.is_dir():
            raise bad_request(f"cwd {cwd!r} is not a directory in the sandbox")
        return str(PurePosixPath(WORKSPACE_IN_SANDBOX) / inside)

    def stop(self, signum: int = signal.SIGKILL) -> None:
        """Stop for good: every session's processes get `signum`, nothing new may start."""
        self.status = "stopped"
        self.touch()
        self.signal_all(signum)

    def signal_all(self, signum: int) -> None:
        for session in self.sessions.values():
            session.signal(signum)

    async def wait_all_exited(self, timeout: float) -> None:
        waits = [session.exited.wait() for session in self.sessions.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout)


class SandboxRegistry:
    """Every sandbox this server knows, and how processes are started in them."""

    def __init__(
        self,
        workspaces_dir: Path,
        agent_choice: launch.AgentChoice = "auto",
        server_env: Mapping[str, str] | None = None,
        *,
        isolation_status: isolation.Status,
        bwrap: str = "bwrap",
        templates: dict[str, isolation.Template] | None = None,
    ) -> None:
        self.workspaces_dir = workspaces_dir
        self.agent_choice: launch.AgentChoice = agent_choice
        self.server_env = dict(os.environ if server_env is None else server_env)
        self.isolation = isolation_status
        self.bwrap = shutil.which(bwrap) or bwrap
        self.templates = dict(isolation.TEMPLATES if templates is None else templates)
        self.claude_cli = launch.claude_cli(self.server_env)
        self._sandboxes: dict[str, Sandbox] = {}

    def create(self, options: SandboxOptions) -> Sandbox:
        sandbox_id = new_id("sb")
        template = isolation.template_for(options.template_id, options.memory_mb, self.templates)
        agent = launch.choose_agent(self.agent_choice, options.envs, self.server_env)
        confinement = isolation.new_confinement(
            self.workspaces_dir / sandbox_id,
            template,
            as_root=os.geteuid() == 0 and self.isolation.mode == "bubblewrap",
            readonly=launch.cli_binds(self.claude_cli) if agent == "claude" else (),
        )
        jail = Jail(self.bwrap, confinement) if self.isolation.mode == "bubblewrap" else None
        sandbox = Sandbox(sandbox_id, options, confinement, agent, jail)
        self._sandboxes[sandbox_id] = sandbox
        logger.info(
            "sandbox %s created (agent %s, %s, network %s) in %s",
            sandbox_id,
            agent,
            "bubblewrap" if jail else "NOT ISOLATED",
            "on" if template.network else "off",
            confinement.workspace,
        )
        return sandbox

    def require_isolation(self) -> None:
        if not self.isolation.runs_processes:
            raise ApiError(503, self.isolation.detail)

    def get(self, sandbox_id: str) -> Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise not_found(f"sandbox {sandbox_id} not found")
        return sandbox

    def find(self, sandbox_id: str) -> Sandbox | None:
        return self._sandboxes.get(sandbox_id)

    def all(self) -> Iterable[Sandbox]:
        return list(self._sandboxes.values())

    async def delete(self, sandbox_id: str) -> None:
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            raise not_found(f"sandbox {sandbox_id} not found")
        logger.info("sandbox %s deleted", sandbox_id)
        sandbox.stop()
        await sandbox.wait_all_exited(DELETE_WAIT_SECONDS)
        await asyncio.to_thread(shutil.rmtree, sandbox.workspace.parent, True)

    async def start_exec(self, sandbox: Sandbox, options: ExecOptions) -> ExecSession:
        sandbox.require_running()
        self.require_isolation()
        spec = ProcessSpec(
            argv=[options.cmd, *options.args],
            cwd=sandbox.resolve_cwd(options.cwd),
            env=sandbox.process_env(options.envs),
            jail=sandbox.jail,
        )
        return await self._spawn(
            sandbox,
            spec,
            kind="exec",
            command=options.cmd,
            args=options.args,
            timeout=options.timeout,
        )

    async def start_agent(
        self, sandbox: Sandbox, options: Mapping[str, Any], prompt: str | None
    ) -> ExecSession:
        sandbox.require_running()
        self.require_isolation()
        argv = launch.agent_argv(sandbox.agent)
        env = launch.agent_env(
            sandbox.agent, sandbox.process_env({}), self.server_env, self.claude_cli
        )
        spec = ProcessSpec(argv=argv, cwd=sandbox.resolve_cwd(None), env=env, jail=sandbox.jail)
        session = await self._spawn(sandbox, spec, kind="agent", command=argv[0], args=argv[1:])
        session.write_stdin(launch.initial_stdin(options, prompt))
        return session

    async def _spawn(
        self,
        sandbox: Sandbox,
        spec: ProcessSpec,
        *,
        kind: SessionKind,
        command: str,
        args: list[str],
        timeout: float = 0,
    ) -> ExecSession:
        try:
            session = await ExecSession.spawn(
                spec,
                session_id=new_id("ses"),
                sandbox_id=sandbox.sandbox_id,
                kind=kind,
                command=command,
                args=args,
                timeout=timeout,
            )
        except SpawnError as exc:
            raise ApiError(400, str(exc)) from exc
        sandbox.sessions[session.session_id] = session
        logger.info(
            "session %s (%s) started in %s: %s",
            session.session_id,
            kind,
            sandbox.sandbox_id,
            command,
        )
        return session

    async def shutdown(self, grace: float = 2.0) -> None:
        """Ask every process to stop, then kill whatever is left after `grace` seconds."""
        sandboxes = self.all()
        for sandbox in sandboxes:
            sandbox.stop(signal.SIGTERM)
        await asyncio.gather(*(sandbox.wait_all_exited(grace) for sandbox in sandboxes))
        self.kill_all_now()

    def kill_all_now(self) -> None:
        for sandbox in self.all():
            sandbox.signal_all(signal.SIGKILL)
