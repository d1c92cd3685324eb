"""The in-sandbox Claude agent wrapper: `python -m dashboard.localsandbox.wrappers.claude`.

It speaks the wrapper line protocol (see `protocol.py` and DESIGN.md section 2) on stdin/stdout
and drives the Claude Code CLI directly in its stream-json protocol (`claude_code.py`): the
CLI's own flags and lines, the surface the Claude Agent SDKs are built on, and no SDK internals.
claude-agent-sdk is needed only for the CLI it ships (or put `claude` on PATH).

Every message is forwarded as the raw JSON object the CLI printed (the stream-json wire shape
the real OpenComputer wrapper forwards). Around them the wrapper adds `ready`, `configured`,
`interrupted`, `turn_complete` and `error`.

One CLI process serves consecutive prompts, so they continue one Claude session. A `configure`
that changes anything restarts the CLI before the next prompt with `--resume <session id>`, so
the conversation carries on under the new settings. docs/claude-wrapper.md has the details.

Why over 400 lines: the CLI's process lifecycle (start, resume, restart on configure) and
the protocol it speaks are one state machine; split, each half would reach into the other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from dashboard.localsandbox.wrappers.claude_code import (
    ClaudeCode,
    ClaudeCodeError,
    cli_args,
    find_cli,
)
from dashboard.localsandbox.wrappers.protocol import Output, config_from, log, stdin_commands

DEFAULT_MODEL = "claude-sonnet-4-20250514"
DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "permissionMode": "bypassPermissions",
    "maxTurns": 50,
}
PERMISSION_MODES = ("default", "acceptEdits", "plan", "bypassPermissions", "dontAsk", "auto")
# How long an interrupted turn may take to wind down before the wrapper stops waiting for it.
INTERRUPT_GRACE_S = 30.0
STDERR_TAIL_LINES = 10


class ConfigError(ValueError):
    """A `configure` value of the wrong type or out of range."""


# ---------------------------------------------------------------- configuration

_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "model": (str, "a string"),
    "systemPrompt": ((str, dict), "a string or an SDK system-prompt object"),
    "allowedTools": (list, "a list of tool names"),
    "permissionMode": (str, "one of " + ", ".join(PERMISSION_MODES)),
    "maxTurns": (int, "a positive integer"),
    "cwd": (str, "a directory path"),
    "mcpServers": (dict, "an object {name: {command, args, env}}"),
    "resume": (str, "a Claude session id"),
}


def validate_config(config: Mapping[str, Any]) -> None:
    """Reject what the SDK or CLI would choke on later, so `configure` fails where it was sent."""
    for key, (kind, description) in _TYPES.items():
        if key in config and (not isinstance(config[key], kind) or isinstance(config[key], bool)):
            raise ConfigError(f"{key} must be {description}")
    if not all(isinstance(tool, str) for tool in config.get("allowedTools", [])):
        raise ConfigError("allowedTools must be a list of tool names")
    if config.get("permissionMode", "default") not in PERMISSION_MODES:
        raise ConfigError(f"permissionMode must be {_TYPES['permissionMode'][1]}")
    if config.get("maxTurns", 1) < 1:
        raise ConfigError("maxTurns must be a positive integer")
    for name, server in config.get("mcpServers", {}).items():
        if not isinstance(server, dict) or not isinstance(server.get("command"), str):
            raise ConfigError(f"mcpServers.{name} must be an object with a string `command`")


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration for the `configured` line. MCP server env values are masked: stdout is
    recorded and shown to every viewer, and those values are usually credentials."""
    shown = dict(config)
    if "mcpServers" in shown:
        shown["mcpServers"] = {
            name: {**server, "env": dict.fromkeys(server["env"], "***")}
            if isinstance(server.get("env"), dict)
            else server
            for name, server in shown["mcpServers"].items()
        }
    return shown


def cli_env() -> dict[str, str]:
    """Extra environment for the Claude Code CLI.

    The CLI refuses bypassPermissions (`--dangerously-skip-permissions`) for uid 0 unless the
    environment has exactly IS_SANDBOX=1, declaring a deliberate sandbox. Sandboxes commonly run
    as root and this wrapper exists to run inside one, so it declares it. A false-looking
    IS_SANDBOX in our own environment (0, false, no, off) opts out and keeps the CLI's refusal;
    any other value (e.g. "yes", which the CLI itself would not accept) counts as a yes.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return {}
    if os.environ.get("IS_SANDBOX", "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    return {"IS_SANDBOX": "1"}


def build_client(
    config: Mapping[str, Any], resume: str | None, cli: str, on_stderr: Callable[[str], None]
) -> ClaudeCode:
    """A CLI process for these settings (its cwd is the configured one, relative to ours)."""
    return ClaudeCode(
        [cli, *cli_args(config, resume)],
        env={**os.environ, **cli_env()},
        cwd=config.get("cwd"),
        on_stderr=on_stderr,  # logged, and its tail explains a crash
    )


def result_text(message: dict[str, Any]) -> str:
    errors = message.get("errors")
    if isinstance(errors, list) and errors:
        return "; ".join(str(error) for error in errors)
    return str(message.get("result") or message.get("subtype") or "Claude Code failed")


def describe(exc: BaseException, stderr_tail: deque[str]) -> str:
    """An error message worth showing: the exception and, when it says little, the CLI's stderr."""
    text = str(exc) or type(exc).__name__
    if "stderr" in text or "exit code" in text:
        said = [line for line in stderr_tail if line not in text]
        if said:
            text += " | Claude Code: " + " / ".join(said)
    return text


# ---------------------------------------------------------------- turns and the CLI process


@dataclass
class Turn:
    """One prompt being answered."""

    text: str
    resume: str | None = None
    interrupted: bool = False
    sending: bool = False  # the prompt is going to the CLI: an interrupt must go there too
    written: asyncio.Event = field(default_factory=asyncio.Event)  # ... but only after it
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, error: str | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass
class Connection:
    """A running CLI process and the task forwarding its messages."""

    client: ClaudeCode
    config: dict[str, Any]
    session_id: str | None  # the Claude session this CLI is on, once known
    pump: asyncio.Task[None] | None = None
    alive: bool = True
    confirmed: bool = False  # the CLI has said which session it runs
    startup_failure: str | None = None  # what the CLI said when it failed before any prompt


class ClaudeWrapper:
    def __init__(self, out: Output, cli: str | None = None) -> None:
        self.out = out
        self.cli = cli
        self.config: dict[str, Any] = dict(DEFAULTS)
        self.session_id: str | None = None  # the Claude session the next prompt continues
        self.confirmed_session_id: str | None = None  # the last one the CLI actually ran
        self.prompts: asyncio.Queue[Turn | None] = asyncio.Queue()
        self.connection: Connection | None = None
        self.turn: Turn | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._background: set[asyncio.Task[None]] = set()
        self._signal: int | None = None

    async def run(self) -> int:
        self._stop_on_signals()
        worker = asyncio.create_task(self._work())
        try:
            self.out.emit({"type": "ready"})
            async for command in stdin_commands():
                self._dispatch(command)
            # stdin closed: answer what was already accepted, then leave.
            await self.prompts.put(None)
            await worker
            return 0
        except asyncio.CancelledError:
            if self._signal is None:
                raise
            return 128 + self._signal
        finally:
            worker.cancel()
            await self._disconnect()

    def _stop_on_signals(self) -> None:
        """SIGTERM/SIGINT (the session being killed) still stop the CLI child before we exit."""
        main_task = asyncio.current_task()
        assert main_task is not None
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            self._signal = signum
            main_task.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signum)

    # -- stdin commands

    def _dispatch(self, command: dict[str, Any]) -> None:
        kind = command["type"]
        if kind == "configure":
            self._configure(command)
        elif kind == "prompt":
            self._enqueue_prompt(command)
        elif kind == "interrupt":
            self._spawn(self._interrupt())
        else:
            self.out.error(f"unknown command type: {kind}")

    def _configure(self, command: dict[str, Any]) -> None:
        update = config_from(command)
        try:
            validate_config(update)
        except ConfigError as exc:
            self.out.error(f"configure: {exc}")
            return
        if "resume" in update:
            self.session_id = update.pop("resume")
        # A running CLI keeps its settings; the next prompt starts one with these.
        self.config.update(update)
        shown = public_config(self.config)
        if self.session_id:
            shown["resume"] = self.session_id
        self.out.emit({"type": "configured", **shown})

    def _enqueue_prompt(self, command: dict[str, Any]) -> None:
        text, resume = command.get("text"), command.get("resume")
        if not isinstance(text, str) or not text.strip():
            self.out.error("prompt: `text` must be a non-empty string")
        elif resume is not None and not isinstance(resume, str):
            self.out.error("prompt: `resume` must be a Claude session id")
        else:
            self.prompts.put_nowait(Turn(text=text, resume=resume or None))

    async def _interrupt(self) -> None:
        turn, connection = self.turn, self.connection
        if turn is None or turn.done.is_set():
            log("interrupt: no turn is running")
            return
        turn.interrupted = True
        if not turn.sending or connection is None:
            return  # the turn worker sees the flag and never sends the prompt
        # An interrupt the CLI reads before the prompt would interrupt nothing.
        await turn.written.wait()
        try:
            await connection.client.interrupt()
        except Exception as exc:  # the CLI may have finished or died meanwhile
            log(f"interrupt failed: {exc!r}")
            return
        # The CLI ends an interrupted turn with a result; should it never come, stop waiting
        # and give the next prompt a fresh CLI.
        try:
            await asyncio.wait_for(turn.done.wait(), INTERRUPT_GRACE_S)
        except TimeoutError:
            log("the interrupted turn did not end; the next prompt restarts Claude Code")
            connection.alive = False
            turn.finish()

    # -- the turn worker

    async def _work(self) -> None:
        while (turn := await self.prompts.get()) is not None:
            self.turn = turn
            try:
                await self._run_turn(turn)
            except Exception as exc:  # keep serving later prompts whatever one turn hit
                log(f"turn failed: {exc!r}")
                turn.finish(describe(exc, self.stderr_tail))
            finally:
                self.turn = None
            if turn.interrupted:
                self.out.emit({"type": "interrupted"})
            elif turn.error:
                self.out.error(turn.error)
            self.out.emit({"type": "turn_complete", "claude_session_id": self.session_id})

    async def _run_turn(self, turn: Turn) -> None:
        if turn.resume:
            self.session_id = turn.resume
        connection = await self._connection()
        if turn.interrupted:  # interrupted while the CLI was starting: nothing to answer
            turn.finish()
            return
        turn.sending = True
        try:
            await connection.client.query(turn.text)
        finally:
            turn.written.set()
        await turn.done.wait()

    async def _connection(self) -> Connection:
        """The live CLI for the current settings and session, (re)started when either changed."""
        current = self.connection
        if (
            current is not None
            and current.alive
            and current.config == self.config
            and self.session_id in (None, current.session_id)
        ):
            return current
        await self._disconnect()
        self.stderr_tail.clear()
        assert self.cli is not None
        client = build_client(self.config, self.session_id, self.cli, self._on_stderr)
        try:
            await client.connect()
        except Exception:
            # A session the CLI cannot resume must not poison every later prompt.
            self.session_id = self.confirmed_session_id
            raise
        connection = Connection(client=client, config=dict(self.config), session_id=self.session_id)
        connection.pump = asyncio.create_task(self._pump(connection))
        self.connection = connection
        try:
            await client.initialize()
        except Exception as exc:
            if connection.startup_failure:
                raise ClaudeCodeError(connection.startup_failure) from exc
            raise
        return connection

    async def _pump(self, connection: Connection) -> None:
        """Forward every message of one CLI process as it arrives, within a turn or not."""
        error: str | None = None
        try:
            async for message in connection.client.messages():
                self._forward(connection, message)
        except Exception as exc:
            error = describe(exc, self.stderr_tail)
            log(f"Claude Code stopped: {error}")
        finally:
            connection.alive = False
            if not connection.confirmed and self.connection is connection:
                # A session the CLI could not resume must not poison every later prompt.
                self.session_id = self.confirmed_session_id
            if self.turn is not None and self.connection is connection:
                self.turn.finish(error or "Claude Code exited before the turn ended")

    def _forward(self, connection: Connection, message: dict[str, Any]) -> None:
        current = connection is self.connection
        turn = self.turn if current else None
        before_any_prompt = turn is None or not turn.sending
        if message.get("type") == "result" and not connection.confirmed and before_any_prompt:
            # A result before any prompt (e.g. for a session it cannot resume): the start
            # failed, and the turn reports that as an error instead.
            connection.startup_failure = result_text(message)
            log(f"Claude Code failed to start: {connection.startup_failure}")
            return
        session_id = message.get("session_id")
        if current and isinstance(session_id, str) and session_id:
            self.session_id = self.confirmed_session_id = connection.session_id = session_id
            connection.confirmed = True
        if message.get("type") != "result":
            self.out.emit(message)
            return
        if turn is not None and turn.interrupted:
            log("dropping the interrupted turn's result")  # `interrupted` stands in for it
        else:
            self.out.emit(message)
        if turn is not None and turn.sending:
            turn.finish()

    async def _disconnect(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None:
            return
        try:
            await connection.client.disconnect()
        except Exception as exc:
            log(f"disconnect: {exc!r}")
        if connection.pump is not None:
            connection.pump.cancel()

    # -- helpers

    def _on_stderr(self, line: str) -> None:
        self.stderr_tail.append(line)
        log(f"claude: {line}")

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)  # keep a reference: the loop only holds weak ones
        task.add_done_callback(self._background.discard)


def main() -> int:
    out = Output()
    if not os.environ.get("ANTHROPIC_API_KEY"):
        out.error("ANTHROPIC_API_KEY is not set: the Claude agent cannot run without it")
        return 1
    cli = find_cli()
    if cli is None:
        out.error(
            "the Claude Code CLI was not found: install claude-agent-sdk "
            "(pip install 'porthole[claude]'), put `claude` on PATH or set CLAUDE_CODE_CLI"
        )
        return 1
    return asyncio.run(ClaudeWrapper(out, cli).run())


if __name__ == "__main__":
    sys.exit(main())
