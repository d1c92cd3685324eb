"""The offline demo agent: the wrapper protocol with a tiny script language instead of a model.

    python -m dashboard.localsandbox.wrappers.demo

It needs no key and no network, so the whole product can be developed, tested and shown
offline. Each prompt is a script, one instruction a line (leading and trailing spaces are
ignored; a line that is not a well-formed instruction is plain text):

    $ <command>              a Bash tool call: runs `sh -c` in the cwd (60 s cap), result follows
    sleep <seconds>          a long step: a progress text about once a second; interruptible
    flood <count> [<bytes>]  `count` texts of `bytes` characters (default 200) as fast as possible,
                             each line carrying a top-level "demo_emitted_at": time.time()
    fail <message>           ends the turn with an `error_during_execution` result
    exit <code>              exits the process at once with that code (0-255), no result
    anything else            assistant text; consecutive text lines form one text block

Every turn emits `system`/`init`, the script's messages, `result`, then `turn_complete`,
shaped as the Claude Agent SDK forwards them. An interrupt stops the turn within
milliseconds (a running command is killed) and emits `interrupted` instead of `result`,
then `turn_complete`: as with the Claude wrapper, `turn_complete` ends every turn. Prompts
that arrive during a turn are queued; an interrupt stops only the current turn. At stdin
EOF the agent finishes the current and queued turns and exits 0. `configured` echoes the
effective configuration like the Claude wrapper does (MCP env values masked, `resume` = the
current session id).

Why over 400 lines: it is the whole demo agent in one file (script language, turns,
commands, interrupts), run inside each sandbox; its parts are only used together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import string
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..process_tree import session_processes
from .protocol import Output, config_from, log, stdin_commands

DEFAULT_MODEL = "demo"
DEFAULT_PERMISSION_MODE = "bypassPermissions"
TOOLS = ["Bash"]
COMMAND_TIMEOUT_SECONDS = 60.0
# After a command exits, how long what its leftover children write is still taken.
OUTPUT_GRACE_SECONDS = 0.5
TOOL_OUTPUT_LIMIT = 30_000
DEFAULT_FLOOD_BYTES = 200
_ID_ALPHABET = string.ascii_letters + string.digits


# -- the script ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Shell:
    command: str


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Flood:
    count: int
    size: int


@dataclass(frozen=True)
class Fail:
    message: str


@dataclass(frozen=True)
class Exit:
    code: int


Step = Say | Shell | Sleep | Flood | Fail | Exit

_SHELL = re.compile(r"^\$\s+(?P<command>\S.*)$")
_SLEEP = re.compile(r"^sleep\s+(?P<seconds>\d+(?:\.\d+)?)$")
_FLOOD = re.compile(r"^flood\s+(?P<count>\d+)(?:\s+(?P<size>\d+))?$")
_FAIL = re.compile(r"^fail(?:\s+(?P<message>.*))?$")
_EXIT = re.compile(r"^exit\s+(?P<code>25[0-5]|2[0-4]\d|1?\d?\d)$")


def parse_instruction(line: str) -> Step | None:
    """The instruction on this line, or None when the line is plain text."""
    line = line.strip()
    if match := _SHELL.match(line):
        return Shell(match["command"])
    if match := _SLEEP.match(line):
        return Sleep(float(match["seconds"]))
    if match := _FLOOD.match(line):
        size = int(match["size"]) if match["size"] else DEFAULT_FLOOD_BYTES
        return Flood(int(match["count"]), size)
    if match := _FAIL.match(line):
        return Fail((match["message"] or "").strip() or "the demo script asked to fail")
    if match := _EXIT.match(line):
        return Exit(int(match["code"]))
    return None


def parse_script(text: str) -> list[Step]:
    steps: list[Step] = []
    text_lines: list[str] = []

    def flush_text() -> None:
        block = "\n".join(text_lines).strip("\n")
        if block.strip():
            steps.append(Say(block))
        text_lines.clear()

    for line in text.splitlines():
        step = parse_instruction(line)
        if step is None:
            text_lines.append(line)
            continue
        flush_text()
        steps.append(step)
    flush_text()
    return steps


# -- message shapes ------------------------------------------------------------------------


def random_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def filler_text(index: int, count: int, size: int) -> str:
    head = f"flood {index + 1}/{count} "
    body = "lorem ipsum dolor sit amet " * (size // 27 + 1)
    return (head + body)[:size]


class TurnFailed(Exception):
    def __init__(self, subtype: str, message: str) -> None:
        super().__init__(message)
        self.subtype = subtype
        self.message = message


# -- the agent -----------------------------------------------------------------------------


class DemoAgent:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.config: dict[str, Any] = {}
        self.session_id = str(uuid.uuid4())
        self.prompts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.current_turn: asyncio.Task[None] | None = None

    @property
    def model(self) -> str:
        return str(self.config.get("model") or DEFAULT_MODEL)

    @property
    def cwd(self) -> str:
        configured = self.config.get("cwd")
        return str(Path(os.getcwd(), configured)) if configured else os.getcwd()

    async def run(self) -> int:
        self.out.emit({"type": "ready"})
        log(f"demo agent ready (pid {os.getpid()})")
        worker = asyncio.create_task(self._work())
        async for command in stdin_commands():
            self.handle(command)
        await self.prompts.join()  # stdin closed: finish what was asked, then leave
        worker.cancel()
        return 0

    def handle(self, command: dict[str, Any]) -> None:
        kind = command["type"]
        if kind == "configure":
            self.configure(command)
        elif kind == "prompt":
            text = command.get("text")
            if not isinstance(text, str) or not text.strip():
                self.out.error("prompt: `text` must be a non-empty string")
                return
            self.prompts.put_nowait(command)
        elif kind == "interrupt":
            self.interrupt()
        else:
            self.out.error(f"unknown command type: {kind}")

    def configure(self, command: dict[str, Any]) -> None:
        applied = config_from(command)
        if applied.get("resume"):
            self.session_id = str(applied.pop("resume"))
        self.config.update(applied)
        self.out.emit({"type": "configured", **self.public_config()})

    def public_config(self) -> dict[str, Any]:
        """The effective configuration; MCP env values masked (stdout is shown to viewers)."""
        shown: dict[str, Any] = {
            "model": self.model,
            "permissionMode": DEFAULT_PERMISSION_MODE,
            **self.config,
        }
        servers = shown.get("mcpServers")
        if isinstance(servers, dict):
            shown["mcpServers"] = {
                name: {**server, "env": dict.fromkeys(server["env"], "***")}
                if isinstance(server, dict) and isinstance(server.get("env"), dict)
                else server
                for name, server in servers.items()
            }
        shown["resume"] = self.session_id
        return shown

    def interrupt(self) -> None:
        if self.current_turn is not None and not self.current_turn.done():
            self.current_turn.cancel()
        else:
            log("interrupt while idle: nothing to stop")

    async def _work(self) -> None:
        while True:
            prompt = await self.prompts.get()
            self.current_turn = asyncio.create_task(Turn(self, prompt).run())
            await asyncio.wait({self.current_turn})
            if self.current_turn.cancelled():
                self.out.emit({"type": "interrupted"})
                self.out.emit({"type": "turn_complete", "claude_session_id": self.session_id})
            elif error := self.current_turn.exception():
                self.out.error(f"turn failed: {error!r}")
            self.current_turn = None
            self.prompts.task_done()


class Turn:
    """One prompt, run as a script."""

    def __init__(self, agent: DemoAgent, prompt: dict[str, Any]) -> None:
        self.agent = agent
        self.out = agent.out
        self.text: str = prompt["text"]
        self.resume = prompt.get("resume")
        self.num_turns = 1
        self.output_tokens = 0
        self.last_text = ""
        self.started = time.monotonic()

    async def run(self) -> None:
        if isinstance(self.resume, str) and self.resume:
            self.agent.session_id = self.resume
        self.out.emit(self._init_message())
        try:
            for step in parse_script(self.text):
                await self._run_step(step)
        except TurnFailed as failure:
            self._finish(failure.subtype, failure.message, is_error=True)
            return
        self._finish("success", self.last_text, is_error=False)

    async def _run_step(self, step: Step) -> None:
        match step:
            case Say(text):
                self._say(text)
            case Shell(command):
                await self._shell(command)
            case Sleep(seconds):
                await self._sleep(seconds)
            case Flood(count, size):
                await self._flood(count, size)
            case Fail(message):
                raise TurnFailed("error_during_execution", message)
            case Exit(code):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    # -- steps -----------------------------------------------------------------------------

    def _say(self, text: str, **extra: Any) -> None:
        self.last_text = text
        self._assistant([{"type": "text", "text": text}], "end_turn", **extra)

    async def _shell(self, command: str) -> None:
        max_turns = self.agent.config.get("maxTurns")
        if isinstance(max_turns, int) and self.num_turns >= max_turns:
            raise TurnFailed("error_max_turns", f"Reached maximum number of turns ({max_turns})")
        tool_use_id = random_id("toolu_")
        tool_input = {"command": command, "description": f"Run: {command}"[:80]}
        self._assistant(
            [{"type": "tool_use", "id": tool_use_id, "name": "Bash", "input": tool_input}],
            "tool_use",
        )
        content, is_error = await run_shell(command, self.agent.cwd)
        self.num_turns += 1
        self._user_tool_result(tool_use_id, content, is_error)

    async def _sleep(self, seconds: float) -> None:
        start = time.monotonic()
        self._say(f"Working for {seconds:g} s…")
        while (remaining := seconds - (time.monotonic() - start)) > 0:
            await asyncio.sleep(min(1.0, remaining))
            elapsed = time.monotonic() - start
            if elapsed < seconds:
                self._say(f"Still working: {elapsed:.0f} s of {seconds:g} s.")
        self._say(f"Done after {seconds:g} s.")

    async def _flood(self, count: int, size: int) -> None:
        for index in range(count):
            self._say(filler_text(index, count, size), demo_emitted_at=time.time())
            await asyncio.sleep(0)  # let an interrupt in between any two events

    # -- messages --------------------------------------------------------------------------

    def _envelope(self, message: dict[str, Any], kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "message": message,
            "parent_tool_use_id": None,
            "session_id": self.agent.session_id,
            "uuid": str(uuid.uuid4()),
        }

    def _assistant(self, content: list[dict[str, Any]], stop_reason: str, **extra: Any) -> None:
        output_tokens = sum(estimate_tokens(str(block)) for block in content)
        self.output_tokens += output_tokens
        message = {
            "id": random_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.agent.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": estimate_tokens(self.text), "output_tokens": output_tokens},
        }
        self.out.emit({**self._envelope(message, "assistant"), **extra})

    def _user_tool_result(self, tool_use_id: str, content: str, is_error: bool) -> None:
        block = {
            "type": "tool_result",
            "tool_use_id": tool_use_id,
            "content": content,
            "is_error": is_error,
        }
        self.out.emit(self._envelope({"role": "user", "content": [block]}, "user"))

    def _init_message(self) -> dict[str, Any]:
        config = self.agent.config
        servers = config.get("mcpServers")
        return {
            "type": "system",
            "subtype": "init",
            "session_id": self.agent.session_id,
            "uuid": str(uuid.uuid4()),
            "model": self.agent.model,
            "cwd": self.agent.cwd,
            "tools": TOOLS,
            # The demo starts no MCP server; it reports each configured one as failed.
            "mcp_servers": [{"name": name, "status": "failed"} for name in servers or {}],
            "permissionMode": config.get("permissionMode") or DEFAULT_PERMISSION_MODE,
            "apiKeySource": "none",
            "claude_code_version": "demo",
            "output_style": "default",
            "slash_commands": [],
        }

    def _finish(self, subtype: str, result: str, *, is_error: bool) -> None:
        duration_ms = int((time.monotonic() - self.started) * 1000)
        message: dict[str, Any] = {
            "type": "result",
            "subtype": subtype,
            "is_error": is_error,
            "duration_ms": duration_ms,
            "duration_api_ms": 0,
            "num_turns": self.num_turns,
            "result": result,
            "session_id": self.agent.session_id,
            "total_cost_usd": 0,
            "usage": {
                "input_tokens": estimate_tokens(self.text),
                "output_tokens": self.output_tokens,
            },
            "permission_denials": [],
            "uuid": str(uuid.uuid4()),
        }
        if is_error:
            message["errors"] = [result]
        self.out.emit(message)
        self.out.emit({"type": "turn_complete", "claude_session_id": self.agent.session_id})


# -- the Bash tool -------------------------------------------------------------------------


def command_timeout() -> float:
    """60 s, or `$DEMO_COMMAND_TIMEOUT_S` (a sandbox's environment may shorten or lengthen it)."""
    try:
        value = float(os.environ.get("DEMO_COMMAND_TIMEOUT_S", COMMAND_TIMEOUT_SECONDS))
    except ValueError:
        return COMMAND_TIMEOUT_SECONDS
    return value if value > 0 else COMMAND_TIMEOUT_SECONDS


async def run_shell(command: str, cwd: str) -> tuple[str, bool]:
    """Run `sh -c command`; (combined output, is_error). Cancelling kills the command.

    The command's end is its process's exit, not end-of-file on its output: a child that
    daemonised (double fork, `setsid`) may hold the pipe open for ever. Once the process has
    exited, what it wrote is read for a moment longer and the rest is not waited for; on an
    interrupt or the time limit, its process group and every descendant are killed first.
    """
    read_fd, write_fd = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            command,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            # A plain descriptor, not an asyncio pipe: asyncio's wait() would wait for the
            # pipe to close as well as for the process.
            stdout=write_fd,
            stderr=write_fd,
            # Its own process group, so an interrupt can kill the command and its children;
            # still in the agent's session, so killing the agent session kills it too.
            process_group=0,
        )
    except OSError as exc:
        os.close(read_fd)
        return f"cannot run command: {exc}", True
    finally:
        os.close(write_fd)
    output = _CappedOutput(TOOL_OUTPUT_LIMIT * 4)
    reading = asyncio.create_task(output.read(read_fd))
    try:
        code = await asyncio.wait_for(process.wait(), command_timeout())
    except TimeoutError:
        _kill_tree(process.pid)
        await process.wait()
        reading.cancel()
        return f"Command timed out after {command_timeout():g} s", True
    except asyncio.CancelledError:
        _kill_tree(process.pid)
        reading.cancel()
        raise
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reading), OUTPUT_GRACE_SECONDS)
    reading.cancel()
    text = bytes(output.kept).decode("utf-8", errors="replace")
    truncated_from = output.total if output.total > len(output.kept) else None
    return _tool_output(text, truncated_from=truncated_from, code=code), code != 0


class _CappedOutput:
    """Up to `limit` bytes of a pipe, counting (and dropping) the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.total = 0

    async def read(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while chunk := await reader.read(64 * 1024):
                self.total += len(chunk)
                self.kept += chunk[: max(0, self.limit - len(self.kept))]
        finally:
            transport.close()


def _tool_output(text: str, *, truncated_from: int | None, code: int) -> str:
    """The tool result text: capped, with a note saying so, and the exit code when not 0."""
    text = text.rstrip("\n")
    if len(text) > TOOL_OUTPUT_LIMIT or truncated_from is not None:
        total = truncated_from or len(text.encode())
        text = text[:TOOL_OUTPUT_LIMIT]
        text += f"\n[output truncated: first {TOOL_OUTPUT_LIMIT} characters of {total} bytes shown]"
    if code != 0:
        text += f"\nExit code {code}" if text else f"Exit code {code}"
    return text


def _kill_tree(pid: int) -> None:
    """SIGKILL the command's process group and everything it started that is still its own."""
    members = session_processes(pid)  # before any dies: their orphans would leave the tree
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for member in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)


def main() -> int:
    return asyncio.run(DemoAgent(Output()).run())


if __name__ == "__main__":
    sys.exit(main())
