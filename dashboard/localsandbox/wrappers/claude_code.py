"""The Claude Code CLI, spoken to directly in its stream-json protocol.

    claude --output-format stream-json --verbose --input-format stream-json [options]

stdin takes one JSON object a line: a user message (`{"type": "user", "message": {...}}`) per
prompt, and `control_request`s (here only `interrupt`). stdout prints one JSON object a line:
the SDK's wire messages (`system`, `assistant`, `user`, `result`, ...), which the wrapper
forwards untouched, and a `control_response` to each control request. These are the CLI's
own flags and line protocol, the surface every Claude Agent SDK is built on, so the wrapper
relies on no SDK internals.

Tested with Claude Code 2.1.332 (the CLI bundled with claude-agent-sdk 0.2.189).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

TESTED_CLI_VERSIONS = "2.1.332"
# A stdout line longer than this (a huge tool result) ends the connection with an error.
LINE_LIMIT = 64 * 1024 * 1024
CONTROL_TIMEOUT_S = 30.0
CLOSE_GRACE_S = 5.0


class ClaudeCodeError(Exception):
    """The CLI could not be started, refused a control request, or ended unexpectedly."""


def find_cli(environ: Mapping[str, str] | None = None) -> str | None:
    """`$CLAUDE_CODE_CLI`, else `claude` on PATH, else the CLI claude-agent-sdk ships with."""
    env = os.environ if environ is None else environ
    if env.get("CLAUDE_CODE_CLI"):
        return env["CLAUDE_CODE_CLI"]
    found = shutil.which("claude", path=env.get("PATH"))
    if found:
        return found
    try:
        import claude_agent_sdk
    except ImportError:
        return None
    # The package ships the CLI as a data file; it is the same binary `claude` would be.
    bundled = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    return str(bundled) if bundled.is_file() else None


def system_prompt_args(value: str | dict[str, Any] | None) -> list[str]:
    """Unset keeps Claude Code's own prompt; a string replaces it; an SDK system-prompt object
    (`{"type": "preset", "append": ...}` or `{"type": "custom", "prompt": ...}`) maps to the
    flag it stands for."""
    if value is None:
        return []
    if isinstance(value, str):
        return ["--system-prompt", value]
    if value.get("type") == "preset":
        append = value.get("append")
        return ["--append-system-prompt", append] if isinstance(append, str) and append else []
    prompt = value.get("prompt")
    return ["--system-prompt", prompt] if isinstance(prompt, str) else []


def cli_args(config: Mapping[str, Any], resume: str | None) -> list[str]:
    """The CLI's flags for the wrapper's configuration (see wrappers/claude.py's DEFAULTS)."""
    args = ["--output-format", "stream-json", "--verbose", "--input-format", "stream-json"]
    args += ["--model", str(config["model"])]
    args += ["--permission-mode", str(config["permissionMode"])]
    args += ["--max-turns", str(config["maxTurns"])]
    args += system_prompt_args(config.get("systemPrompt"))
    if config.get("allowedTools"):
        args += ["--allowedTools", ",".join(config["allowedTools"])]
    servers = config.get("mcpServers") or {}
    if servers:
        stdio = {name: {"type": "stdio", **server} for name, server in servers.items()}
        args += ["--mcp-config", json.dumps({"mcpServers": stdio})]
    if resume:
        args.append(f"--resume={resume}")
    return args


class ClaudeCode:
    """One CLI process: start it, send prompts and interrupts, read its messages."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        on_stderr: Callable[[str], None],
    ) -> None:
        self._argv = argv
        self._env = dict(env)
        self._cwd = cwd
        self._on_stderr = on_stderr
        self._process: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)

    async def connect(self) -> None:
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self._cwd,
                env=self._env,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise ClaudeCodeError(f"cannot start Claude Code ({self._argv[0]}): {exc}") from exc
        self._stderr_task = asyncio.create_task(self._read_stderr())

    async def query(self, text: str) -> None:
        await self._write(
            {
                "type": "user",
                "message": {"role": "user", "content": text},
                "parent_tool_use_id": None,
                "session_id": "",
            }
        )

    async def initialize(self) -> None:
        """Open the control protocol. `systemPromptSnapshot: false` makes a resumed session take
        the system prompt given now, not the one it started with (which the CLI keeps by
        default), so a `configure` that changes the prompt takes effect. Needs `messages()`
        being read."""
        await self._control({"subtype": "initialize", "hooks": None, "systemPromptSnapshot": False})

    async def interrupt(self) -> None:
        """Ask the CLI to stop the turn; returns once it has acknowledged the request."""
        await self._control({"subtype": "interrupt"})

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        request_id = f"req_{next(self._ids)}"
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            await self._write(
                {"type": "control_request", "request_id": request_id, "request": request}
            )
            response: dict[str, Any] = await asyncio.wait_for(answer, CONTROL_TIMEOUT_S)
        finally:
            self._pending.pop(request_id, None)
        if response.get("subtype") == "error":
            reason = response.get("error", "no reason")
            raise ClaudeCodeError(f"Claude Code refused {request['subtype']}: {reason}")
        return response

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Every message the CLI prints, control traffic taken out; ends when it exits."""
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        while True:
            try:
                line = await stdout.readline()
            except ValueError as exc:  # a line past LINE_LIMIT
                raise ClaudeCodeError(f"Claude Code printed a line too long: {exc}") from exc
            if not line:
                break
            text = line.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                message = json.loads(text)
            except json.JSONDecodeError:
                self._on_stderr(f"(stdout, not JSON) {text[:500]}")
                continue
            if not isinstance(message, dict):
                continue
            kind = message.get("type")
            if kind == "control_response":
                self._answer(message.get("response") or {})
            elif kind == "control_request":
                await self._refuse(message)
            elif kind != "control_cancel_request":
                yield message
        code = await self._process.wait()
        if self._stderr_task is not None:  # its last words explain the exit
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), CLOSE_GRACE_S)
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(ClaudeCodeError(f"Claude Code exited (exit code {code})"))
        if code != 0:
            raise ClaudeCodeError(f"Claude Code exited with exit code {code}")

    async def disconnect(self) -> None:
        """Close its stdin (it finishes and exits), then terminate it if it lingers."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), CLOSE_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), CLOSE_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._stderr_task, CLOSE_GRACE_S)
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(ClaudeCodeError("Claude Code stopped"))

    # -- helpers

    async def _write(self, message: dict[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None or process.stdin.is_closing():
            raise ClaudeCodeError("Claude Code is not running")
        try:
            process.stdin.write(json.dumps(message).encode() + b"\n")
            await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ClaudeCodeError(f"Claude Code is not reading its input: {exc}") from exc

    def _answer(self, response: dict[str, Any]) -> None:
        answer = self._pending.get(str(response.get("request_id")))
        if answer is not None and not answer.done():
            answer.set_result(response)

    async def _refuse(self, request: dict[str, Any]) -> None:
        """The CLI asks its host only for what the wrapper never sets up (permission prompts,
        hooks, SDK MCP servers): say no rather than leave it waiting."""
        subtype = (request.get("request") or {}).get("subtype")
        with contextlib.suppress(ClaudeCodeError):
            await self._write(
                {
                    "type": "control_response",
                    "response": {
                        "subtype": "error",
                        "request_id": request.get("request_id"),
                        "error": f"the Porthole wrapper does not handle {subtype!r}",
                    },
                }
            )

    async def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        async for line in self._process.stderr:
            text = line.decode("utf-8", errors="replace").rstrip()
            if text:
                self._on_stderr(text)
