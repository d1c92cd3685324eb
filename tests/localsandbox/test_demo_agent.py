"""The demo agent spoken to directly: its stdin and stdout, as the server would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.localsandbox.helpers import eventually, host_pids_marked, process_alive

Event = dict[str, Any]


class DemoAgent:
    """A running `python -m dashboard.localsandbox.wrappers.demo` and every line it printed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[Event] = []
        self.arrivals: list[float] = []  # time.monotonic() when each event was read
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, cwd: Path, **env: str) -> DemoAgent:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dashboard.localsandbox.wrappers.demo",
            cwd=cwd,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.events.append(json.loads(line))
            self.arrivals.append(time.monotonic())
            self._changed.set()
        self._changed.set()

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = 10) -> None:
        async def watch() -> None:
            while not predicate(self.events):
                if self._reader.done():
                    raise AssertionError(f"agent exited first; last events {self.events[-3:]}")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout)

    async def wait_count(self, kind: str, count: int = 1, timeout: float = 10) -> None:
        await self.wait_for(lambda events: len(of_type(events, kind)) >= count, timeout)

    async def turn(self, text: str, **extra: Any) -> list[Event]:
        """Send a prompt and return the events of that turn, up to its turn_complete."""
        start = len(self.events)
        done = len(of_type(self.events, "turn_complete")) + 1
        await self.send(type="prompt", text=text, **extra)
        await self.wait_count("turn_complete", done)
        return self.events[start:]


def of_type(events: list[Event], kind: str) -> list[Event]:
    return [event for event in events if event["type"] == kind]


def blocks(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [
        block
        for event in events
        if event["type"] in ("assistant", "user")
        for block in event["message"]["content"]
        if block["type"] == kind
    ]


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[DemoAgent]:
    agent = await DemoAgent.start(tmp_path)
    await agent.wait_count("ready")
    yield agent
    if agent.process.returncode is None:
        agent.process.kill()
    await agent.process.wait()


async def test_it_announces_ready_and_echoes_the_effective_configuration(
    agent: DemoAgent,
) -> None:
    assert agent.events[0] == {"type": "ready"}
    await agent.send(type="configure", model="demo-large", maxTurns=5, unknownKey="dropped")
    await agent.wait_count("configured")
    (configured,) = of_type(agent.events, "configured")
    session_id = configured.pop("resume")
    assert configured == {
        "type": "configured",
        "model": "demo-large",
        "maxTurns": 5,
        "permissionMode": "bypassPermissions",
    }
    (init,) = of_type(await agent.turn("hi"), "system")
    assert (init["model"], init["session_id"]) == ("demo-large", session_id)


async def test_it_masks_mcp_server_env_values_in_the_configured_echo(agent: DemoAgent) -> None:
    servers = {"files": {"command": "mcp-files", "args": [], "env": {"TOKEN": "s3cret"}}}
    await agent.send(type="configure", mcpServers=servers)
    await agent.wait_count("configured")
    (configured,) = of_type(agent.events, "configured")
    assert configured["mcpServers"] == {
        "files": {"command": "mcp-files", "args": [], "env": {"TOKEN": "***"}}
    }


async def test_it_answers_plain_text_as_one_markdown_block_in_a_full_turn(
    agent: DemoAgent, tmp_path: Path
) -> None:
    events = await agent.turn("# Plan\n\n- **one**\n- two")
    assert [e["type"] for e in events] == ["system", "assistant", "result", "turn_complete"]
    init, assistant, result, complete = events
    assert init["subtype"] == "init"
    assert (init["model"], init["cwd"], init["tools"]) == ("demo", str(tmp_path), ["Bash"])
    assert (init["permissionMode"], init["mcp_servers"]) == ("bypassPermissions", [])
    session_id = init["session_id"]

    message = assistant["message"]
    assert message["id"].startswith("msg_") and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": "# Plan\n\n- **one**\n- two"}]
    assert set(message["usage"]) >= {"input_tokens", "output_tokens"}
    assert (assistant["parent_tool_use_id"], assistant["session_id"]) == (None, session_id)

    assert result["subtype"] == "success" and result["is_error"] is False
    assert result["result"] == "# Plan\n\n- **one**\n- two"
    assert result["total_cost_usd"] == 0 and result["num_turns"] == 1
    assert {"duration_ms", "duration_api_ms", "usage", "session_id"} <= set(result)
    assert complete == {"type": "turn_complete", "claude_session_id": session_id}

    again = await agent.turn("more")
    assert of_type(again, "system")[0]["session_id"] == session_id  # stable per process


async def test_it_runs_shell_lines_as_bash_tool_calls(agent: DemoAgent, tmp_path: Path) -> None:
    events = await agent.turn("$ echo hello && pwd\n$ echo broken >&2; exit 3")
    uses, results = blocks(events, "tool_use"), blocks(events, "tool_result")
    assert [u["name"] for u in uses] == ["Bash", "Bash"]
    assert uses[0]["input"]["command"] == "echo hello && pwd"
    assert all(u["id"].startswith("toolu_") for u in uses)
    assert [r["tool_use_id"] for r in results] == [u["id"] for u in uses]
    assert results[0]["content"] == f"hello\n{tmp_path}"
    assert results[0]["is_error"] is False
    assert results[1]["content"] == "broken\nExit code 3"
    assert results[1]["is_error"] is True
    assert of_type(events, "result")[0]["num_turns"] == 3


async def test_it_runs_commands_in_the_configured_cwd(agent: DemoAgent, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    await agent.send(type="configure", cwd="sub")
    events = await agent.turn("$ pwd")
    assert blocks(events, "tool_result")[0]["content"] == str(tmp_path / "sub")
    assert of_type(events, "system")[0]["cwd"] == str(tmp_path / "sub")


async def test_it_caps_long_tool_output_with_a_note(agent: DemoAgent) -> None:
    events = await agent.turn("$ head -c 50000 /dev/zero | tr '\\0' a")
    content = blocks(events, "tool_result")[0]["content"]
    assert content.startswith("a" * 30000)
    assert "output truncated" in content and "50000 bytes" in content
    assert len(content) < 30200


async def test_it_fails_a_turn_on_request_and_skips_the_rest(agent: DemoAgent) -> None:
    events = await agent.turn("before\nfail the disk is full\nafter")
    (result,) = of_type(events, "result")
    assert result["subtype"] == "error_during_execution" and result["is_error"] is True
    assert result["result"] == "the disk is full"
    assert result["errors"] == ["the disk is full"]
    assert [b["text"] for b in blocks(events, "text")] == ["before"]
    assert events[-1]["type"] == "turn_complete"


async def test_it_exits_with_the_requested_code_and_no_result(agent: DemoAgent) -> None:
    await agent.send(type="prompt", text="goodbye\nexit 7")
    assert await asyncio.wait_for(agent.process.wait(), 10) == 7
    await agent._reader
    assert [b["text"] for b in blocks(agent.events, "text")] == ["goodbye"]
    assert of_type(agent.events, "result") == []


async def test_it_floods_timestamped_texts_as_fast_as_it_can(agent: DemoAgent) -> None:
    before = time.time()
    events = await agent.turn("flood 300 120")
    floods = of_type(events, "assistant")
    assert len(floods) == 300
    assert all(len(event["message"]["content"][0]["text"]) == 120 for event in floods)
    stamps = [event["demo_emitted_at"] for event in floods]
    assert stamps == sorted(stamps) and before <= stamps[0] and stamps[-1] <= time.time()
    assert floods[0]["message"]["content"][0]["text"].startswith("flood 1/300 ")


async def test_it_reports_progress_about_once_a_second_while_sleeping(agent: DemoAgent) -> None:
    started = time.monotonic()
    events = await agent.turn("sleep 1.5")
    assert [b["text"] for b in blocks(events, "text")] == [
        "Working for 1.5 s…",
        "Still working: 1 s of 1.5 s.",
        "Done after 1.5 s.",
    ]
    assert time.monotonic() - started >= 1.5


@pytest.mark.parametrize("step", ["sleep 30", "$ sleep 30", "flood 100000000"])
async def test_it_stops_a_turn_within_200_ms_of_an_interrupt(agent: DemoAgent, step: str) -> None:
    await agent.send(type="prompt", text=step)
    await agent.wait_count("assistant")
    sent = time.monotonic()
    await agent.send(type="interrupt")
    await agent.wait_count("interrupted")
    index = next(i for i, e in enumerate(agent.events) if e["type"] == "interrupted")
    assert agent.arrivals[index] - sent < 0.2
    assert of_type(agent.events, "result") == []
    # The interrupted turn still ends with turn_complete, as the Claude wrapper's do.
    await agent.wait_count("turn_complete")
    assert agent.events[index + 1]["type"] == "turn_complete"
    # The agent is ready for the next turn at once.
    assert of_type(await agent.turn("next"), "result")[0]["result"] == "next"


async def test_it_kills_the_running_command_on_interrupt(agent: DemoAgent, tmp_path: Path) -> None:
    await agent.send(type="prompt", text="$ echo $$ > pid; exec sleep 30")
    await agent.wait_count("assistant")
    pid_file = tmp_path / "pid"
    await eventually(lambda: pid_file.exists() and pid_file.read_text().strip(), what="pid")
    await agent.send(type="interrupt")
    await agent.wait_count("interrupted")
    pid = int(pid_file.read_text())
    await eventually(lambda: not process_alive(pid), what="the command to be killed")


@pytest.fixture
def mark() -> Iterator[str]:
    """A mark for the processes a test leaves behind on purpose; they are killed afterwards."""
    mark = secrets.token_hex(8)
    yield mark
    for pid in host_pids_marked(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_it_returns_from_an_interrupt_while_a_daemonised_child_holds_the_output(
    agent: DemoAgent, mark: str
) -> None:
    # The double fork leaves `sleep` outside the command's group, its session and its tree,
    # holding the command's stdout: waiting for end-of-file would wait for it.
    script = f"$ (PH_MARK={mark} setsid sleep 300 &); echo started; exec sleep 300"
    await agent.send(type="prompt", text=script)
    await eventually(lambda: host_pids_marked(mark), what="the daemonised child")
    await agent.wait_count("assistant")
    await agent.send(type="interrupt")
    await agent.wait_count("interrupted")
    await agent.wait_count("turn_complete")
    assert of_type(await agent.turn("next"), "result")[0]["result"] == "next"


async def test_it_finishes_a_command_whose_daemonised_child_holds_the_output(
    agent: DemoAgent, mark: str
) -> None:
    script = f"$ (PH_MARK={mark} setsid sleep 300 &); echo finished"
    events = await agent.turn(script)
    (result,) = blocks(events, "tool_result")
    assert result["content"] == "finished" and result["is_error"] is False
    assert host_pids_marked(mark)  # left running: it is not the command, and not in its tree


async def test_it_ends_a_command_at_its_time_limit_though_a_daemon_holds_the_output(
    tmp_path: Path, mark: str
) -> None:
    agent = await DemoAgent.start(tmp_path, DEMO_COMMAND_TIMEOUT_S="0.5")
    try:
        script = f"$ (PH_MARK={mark} setsid sleep 300 &); PH_MARK={mark} exec sleep 300"
        events = await agent.turn(script)
        (result,) = blocks(events, "tool_result")
        assert result == {**result, "content": "Command timed out after 0.5 s", "is_error": True}
        # The command itself was killed; the daemon outside its tree was only not waited for.
        await eventually(lambda: len(host_pids_marked(mark)) == 1, what="the command killed")
    finally:
        agent.process.kill()
        await agent.process.wait()


async def test_it_kills_a_commands_setsid_children_on_interrupt(
    agent: DemoAgent, mark: str
) -> None:
    await agent.send(type="prompt", text=f"$ PH_MARK={mark} setsid sleep 300 & exec sleep 300")
    await eventually(lambda: len(host_pids_marked(mark)) == 1, what="the setsid child")
    await agent.send(type="interrupt")
    await agent.wait_count("interrupted")
    await eventually(lambda: not host_pids_marked(mark), what="the setsid child to die")


async def test_it_ignores_an_interrupt_while_idle(agent: DemoAgent) -> None:
    await agent.send(type="interrupt")
    events = await agent.turn("fine")
    assert [e["type"] for e in events][0] == "system"
    assert of_type(agent.events, "interrupted") == []


async def test_it_queues_prompts_that_arrive_during_a_turn(agent: DemoAgent) -> None:
    await agent.send(type="prompt", text="sleep 0.5")
    await agent.send(type="prompt", text="second")
    await agent.send(type="prompt", text="third")
    await agent.wait_count("turn_complete", 3)
    kinds = [e["type"] for e in agent.events if e["type"] in ("system", "turn_complete")]
    assert kinds == ["system", "turn_complete"] * 3
    assert [r["result"] for r in of_type(agent.events, "result")] == [
        "Done after 0.5 s.",
        "second",
        "third",
    ]


async def test_it_interrupts_only_the_current_turn_and_keeps_the_queue(agent: DemoAgent) -> None:
    await agent.send(type="prompt", text="sleep 30")
    await agent.send(type="prompt", text="queued")
    await agent.wait_count("assistant")
    await agent.send(type="interrupt")
    await agent.wait_count("turn_complete", 2)
    assert [r["result"] for r in of_type(agent.events, "result")] == ["queued"]


async def test_it_resumes_a_previous_session_id(agent: DemoAgent) -> None:
    await agent.send(type="configure", resume="session-from-before")
    events = await agent.turn("hello")
    assert of_type(events, "system")[0]["session_id"] == "session-from-before"
    assert events[-1]["claude_session_id"] == "session-from-before"
    events = await agent.turn("again", resume="another-session")
    assert of_type(events, "result")[0]["session_id"] == "another-session"


async def test_it_reports_configured_mcp_servers_in_the_init(agent: DemoAgent) -> None:
    await agent.send(
        type="configure",
        permissionMode="acceptEdits",
        mcpServers={"files": {"command": "mcp-files", "args": [], "env": {}}},
    )
    (init,) = of_type(await agent.turn("hi"), "system")
    assert init["permissionMode"] == "acceptEdits"
    assert init["mcp_servers"] == [{"name": "files", "status": "failed"}]


async def test_it_stops_at_max_turns(agent: DemoAgent) -> None:
    await agent.send(type="configure", maxTurns=2)
    events = await agent.turn("$ echo one\n$ echo two\ndone")
    (result,) = of_type(events, "result")
    assert result["subtype"] == "error_max_turns" and result["is_error"] is True
    assert len(blocks(events, "tool_use")) == 1


async def test_it_reports_bad_stdin_lines_and_carries_on(agent: DemoAgent) -> None:
    assert agent.process.stdin is not None
    agent.process.stdin.write(b"this is not json\n[1, 2]\n")
    await agent.send(type="prompt", text=5)
    await agent.send(type="prompt", text="  ")
    await agent.send(type="dance")
    await agent.wait_count("error", 5)
    assert all(isinstance(e["message"], str) for e in of_type(agent.events, "error"))
    assert of_type(await agent.turn("still fine"), "result")[0]["result"] == "still fine"


async def test_it_finishes_its_turns_then_exits_zero_at_stdin_eof(agent: DemoAgent) -> None:
    await agent.send(type="prompt", text="sleep 0.3")
    await agent.send(type="prompt", text="last")
    assert agent.process.stdin is not None
    agent.process.stdin.close()
    assert await asyncio.wait_for(agent.process.wait(), 10) == 0
    await agent._reader
    assert [r["result"] for r in of_type(agent.events, "result")] == ["Done after 0.3 s.", "last"]
