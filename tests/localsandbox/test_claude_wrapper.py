"""The claude agent wrapper, run for real: wrapper -> claude-agent-sdk -> Claude Code CLI -> a
local Messages API stand-in (tests/fakes/messages_api.py). Nothing leaves the machine.

Each test starts `python -m dashboard.localsandbox.wrappers.claude` as a subprocess and speaks its
stdin/stdout line protocol directly, the way the sandbox server does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.messages_api import APIError, Hold, MessagesAPI, Text, Thinking, ToolUse

ROOT = Path(__file__).resolve().parents[2]
MODULE = "dashboard.localsandbox.wrappers.claude"
DEFAULT_MODEL = "claude-sonnet-4-20250514"
# A model id the CLI passes through unchanged (it maps some retired ids to newer models).
OTHER_MODEL = "claude-haiku-4-5-20251001"
WAIT_S = 30.0

pytestmark = [pytest.mark.claude, pytest.mark.timeout(90)]


@pytest.fixture(autouse=True)
def _claude_agent_sdk() -> None:
    """Skip without the optional SDK (it carries the CLI), except in CI, where it must be there."""
    if importlib.util.find_spec("claude_agent_sdk") is None:
        reason = "claude-agent-sdk is not installed (pip install -e '.[claude]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


# ---------------------------------------------------------------- driving the wrapper


class Wrapper:
    """A running wrapper process; stdout lines are parsed and queued by a reader thread."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", MODULE],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            # Every stdout line must be one JSON object; json.loads failing here fails the test.
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr.extend(self.process.stderr)

    def send(self, **message: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def read_until(self, kind: str, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        """The lines read from now up to and including the next one of type `kind`."""
        batch: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    self._report(f"no {kind!r} within {timeout}s", batch)
                ) from None
            if message is None:
                raise AssertionError(self._report(f"stdout closed before {kind!r}", batch))
            batch.append(message)
            self.seen.append(message)
            if message.get("type") == kind:
                return batch

    def turn(self, text: str, **extra: Any) -> list[dict[str, Any]]:
        """Send a prompt and return its lines up to turn_complete."""
        self.send(type="prompt", text=text, **extra)
        return self.read_until("turn_complete")

    def wait(self, timeout: float = WAIT_S) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def _report(self, problem: str, batch: list[dict[str, Any]]) -> str:
        lines = "\n".join(json.dumps(m)[:300] for m in batch)
        return f"{problem}\n-- stdout:\n{lines}\n-- stderr:\n{''.join(self.stderr[-30:])}"


def of_type(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("type") == kind]


def only(messages: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_type(messages, kind)
    assert len(found) == 1, f"expected one {kind!r}, got {[m.get('type') for m in messages]}"
    return found[0]


def blocks(messages: list[dict[str, Any]], kind: str, block_type: str) -> list[dict[str, Any]]:
    """Content blocks of `block_type` in the `kind` (assistant/user) messages."""
    return [
        block
        for message in of_type(messages, kind)
        if isinstance(message["message"]["content"], list)
        for block in message["message"]["content"]
        if block.get("type") == block_type
    ]


def text_of(content: Any) -> str:
    """A tool_result's content, which is a string or a list of blocks."""
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict))


def request_text(request: Any) -> str:
    return json.dumps(request.messages)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def api() -> Iterator[MessagesAPI]:
    with MessagesAPI() as server:
        yield server


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def wrapper_env(api: MessagesAPI, tmp_path: Path) -> dict[str, str]:
    """The wrapper's environment: the stand-in as the API, a dummy key, a throwaway HOME."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ANTHROPIC_", "CLAUDE")) and key != "PYTHONPATH"
    }
    home = tmp_path / "home"
    home.mkdir()
    env.update(
        HOME=str(home),
        ANTHROPIC_BASE_URL=api.base_url,
        ANTHROPIC_API_KEY="sk-ant-test-not-a-real-key",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        **MessagesAPI.cli_env(),
    )
    return env


@pytest.fixture
def start_wrapper(wrapper_env: dict[str, str], workspace: Path) -> Iterator[Callable[..., Wrapper]]:
    started: list[Wrapper] = []

    def start(env: dict[str, str] | None = None, expect_ready: bool = True) -> Wrapper:
        wrapper = Wrapper(env if env is not None else wrapper_env, workspace)
        started.append(wrapper)
        if expect_ready:
            assert wrapper.read_until("ready") == [{"type": "ready"}]
        return wrapper

    yield start
    for wrapper in started:
        wrapper.stop()


# ---------------------------------------------------------------- tests


def test_it_answers_a_prompt_with_the_sdk_wire_messages(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper], workspace: Path
) -> None:
    api.script(Text("Hello from the stand-in."))
    wrapper = start_wrapper()

    lines = wrapper.turn("Say hello")

    assert [m["type"] for m in lines][0] == "system"
    assert [m["type"] for m in lines][-2:] == ["result", "turn_complete"]
    init = lines[0]
    session_id = init["session_id"]
    assert init["subtype"] == "init"
    assert init["model"] == DEFAULT_MODEL
    assert init["cwd"] == str(workspace)
    assert "Bash" in init["tools"]
    assert init["mcp_servers"] == []
    assert init["permissionMode"] == "bypassPermissions"

    assistant = only(lines, "assistant")
    assert assistant["message"]["id"].startswith("msg_")
    assert assistant["message"]["model"] == DEFAULT_MODEL
    assert assistant["message"]["content"] == [{"type": "text", "text": "Hello from the stand-in."}]
    assert assistant["message"]["usage"]["input_tokens"] > 0
    assert assistant["parent_tool_use_id"] is None
    assert assistant["session_id"] == session_id
    assert assistant["uuid"]

    result = only(lines, "result")
    assert result["subtype"] == "success"
    assert result["is_error"] is False
    assert result["result"] == "Hello from the stand-in."
    assert result["num_turns"] == 1
    assert isinstance(result["duration_ms"], int)
    assert isinstance(result["duration_api_ms"], int)
    assert result["total_cost_usd"] > 0
    assert result["usage"]["input_tokens"] > 0
    assert result["session_id"] == session_id

    assert lines[-1] == {"type": "turn_complete", "claude_session_id": session_id}

    (request,) = api.turn_requests()
    assert request.model == DEFAULT_MODEL
    assert request.body["stream"] is True
    assert "Say hello" in request_text(request)
    assert api.unknown_requests() == []


def test_it_runs_a_tool_and_forwards_its_use_and_result(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper], workspace: Path
) -> None:
    project = workspace / "project"
    project.mkdir()
    tool = ToolUse("Bash", {"command": "echo hi && pwd", "description": "Say hi"}, text="On it.")
    api.script(tool, Text("It printed hi."))
    wrapper = start_wrapper()
    wrapper.send(type="configure", cwd=str(project))
    assert wrapper.read_until("configured")[-1]["cwd"] == str(project)

    lines = wrapper.turn("Run echo hi")

    assert lines[0]["cwd"] == str(project)
    (tool_use,) = blocks(lines, "assistant", "tool_use")
    assert tool_use == {"type": "tool_use", "id": tool.id, "name": "Bash", "input": tool.input}
    (tool_result,) = blocks(lines, "user", "tool_result")
    assert tool_result["tool_use_id"] == tool.id
    assert tool_result["is_error"] is False
    assert text_of(tool_result["content"]).split() == ["hi", str(project)]  # Bash really ran
    assert [b["text"] for b in blocks(lines, "assistant", "text")] == ["On it.", "It printed hi."]
    result = only(lines, "result")
    assert (result["num_turns"], result["result"]) == (2, "It printed hi.")

    # The CLI sent the tool's output back to the model.
    followup = api.turn_requests()[1]
    assert [r["tool_use_id"] for r in followup.tool_results()] == [tool.id]


def test_it_forwards_thinking_blocks(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    api.script(Thinking("Let me think.", "Thought it through."))
    wrapper = start_wrapper()

    lines = wrapper.turn("Think first")

    (thinking,) = blocks(lines, "assistant", "thinking")
    assert thinking["thinking"] == "Let me think."
    assert [b["text"] for b in blocks(lines, "assistant", "text")] == ["Thought it through."]


def test_it_applies_configure_to_the_model_and_system_prompt(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    api.script(Text("Arr."))
    wrapper = start_wrapper()
    wrapper.send(
        type="configure",
        model=OTHER_MODEL,
        systemPrompt="You are a terse pirate.",
        allowedTools=["Bash(echo:*)"],
        maxTurns=3,
    )

    configured = wrapper.read_until("configured")[-1]
    assert configured == {
        "type": "configured",
        "model": OTHER_MODEL,
        "systemPrompt": "You are a terse pirate.",
        "allowedTools": ["Bash(echo:*)"],
        "maxTurns": 3,
        "permissionMode": "bypassPermissions",
    }

    lines = wrapper.turn("Greet me")
    assert lines[0]["model"] == OTHER_MODEL
    (request,) = api.turn_requests()
    assert request.model == OTHER_MODEL
    assert "You are a terse pirate." in request.system_text


def test_it_stops_at_max_turns(api: MessagesAPI, start_wrapper: Callable[..., Wrapper]) -> None:
    api.script(ToolUse("Bash", {"command": "echo 1"}))
    wrapper = start_wrapper()
    wrapper.send(type="configure", maxTurns=1)
    wrapper.read_until("configured")

    result = only(wrapper.turn("Loop forever"), "result")

    assert result["subtype"] == "error_max_turns"
    assert len(api.turn_requests()) == 1


def test_it_continues_the_session_across_prompts_and_configure(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    api.script(Text("First answer."), Text("Second answer."), Text("Third answer."))
    wrapper = start_wrapper()

    session_id = wrapper.turn("First prompt")[-1]["claude_session_id"]
    assert wrapper.turn("Second prompt")[-1]["claude_session_id"] == session_id
    second = api.turn_requests()[1]
    assert "First prompt" in request_text(second)
    assert "First answer." in request_text(second)

    # New settings restart the CLI on --resume: same session, history kept, new prompt used.
    wrapper.send(type="configure", systemPrompt="Answer in one word.")
    assert wrapper.read_until("configured")[-1]["resume"] == session_id
    lines = wrapper.turn("Third prompt")
    assert lines[0]["session_id"] == session_id
    assert lines[-1]["claude_session_id"] == session_id
    third = api.turn_requests()[2]
    assert "Second answer." in request_text(third)
    assert "Answer in one word." in third.system_text


def test_it_resumes_a_session_from_an_earlier_process(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    api.script(Text("Remember 42."), Text("It was 42."))
    first = start_wrapper()
    session_id = first.turn("Remember a number")[-1]["claude_session_id"]
    first.close_stdin()
    assert first.wait() == 0

    second = start_wrapper()
    lines = second.turn("Which number?", resume=session_id)

    assert lines[-1]["claude_session_id"] == session_id
    assert "Remember 42." in request_text(api.turn_requests()[1])


def test_it_interrupts_a_slow_reply(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    slow = Hold()
    api.script(slow, Text("After the interrupt."))
    wrapper = start_wrapper()
    wrapper.send(type="prompt", text="Take your time")
    assert slow.started.wait(WAIT_S), "the model request never arrived"

    wrapper.send(type="interrupt")
    lines = wrapper.read_until("turn_complete")

    assert [m["type"] for m in lines][-2:] == ["interrupted", "turn_complete"]
    assert of_type(lines, "result") == []
    # The wrapper and the session carry on.
    after = wrapper.turn("Still there?")
    assert only(after, "result")["result"] == "After the interrupt."
    assert after[-1]["claude_session_id"] == lines[-1]["claude_session_id"]


def test_it_queues_prompts_sent_during_a_turn(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    slow = Hold(text="First, slowly.")
    api.script(slow, Text("Second."))
    wrapper = start_wrapper()
    wrapper.send(type="prompt", text="One")
    assert slow.started.wait(WAIT_S)
    wrapper.send(type="prompt", text="Two")
    slow.release()

    first = wrapper.read_until("turn_complete")
    second = wrapper.read_until("turn_complete")

    assert only(first, "result")["result"] == "First, slowly."
    assert only(second, "result")["result"] == "Second."
    assert "Two" not in request_text(api.turn_requests()[0])
    assert "Two" in request_text(api.turn_requests()[1])


def test_it_finishes_the_turn_and_exits_zero_when_stdin_closes(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    slow = Hold(text="Done anyway.")
    api.script(slow)
    wrapper = start_wrapper()
    wrapper.send(type="prompt", text="Work")
    assert slow.started.wait(WAIT_S)

    wrapper.close_stdin()
    slow.release()

    lines = wrapper.read_until("turn_complete")
    assert only(lines, "result")["result"] == "Done anyway."
    assert wrapper.wait() == 0


def test_it_forwards_an_api_error_turn_and_keeps_going(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    api.script(APIError(401, "authentication_error", "invalid x-api-key"), Text("Fine now."))
    wrapper = start_wrapper()

    failed = only(wrapper.turn("Fail"), "result")
    assert failed["is_error"] is True

    assert only(wrapper.turn("Again"), "result")["result"] == "Fine now."


def test_it_reports_bad_commands_and_keeps_running(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper]
) -> None:
    api.script(Text("Still fine."))
    wrapper = start_wrapper()

    wrapper.send(type="configure", maxTurns="ten")
    assert "maxTurns" in wrapper.read_until("error")[-1]["message"]
    wrapper.send(type="dance")
    assert "dance" in wrapper.read_until("error")[-1]["message"]
    unknown = "4b7e1f0c-0000-4000-8000-000000000000"
    lines = wrapper.turn("Resume a session that never was", resume=unknown)
    assert [m["type"] for m in lines] == ["error", "turn_complete"]
    assert unknown in lines[0]["message"]

    # None of that stuck: the next prompt starts a fresh session with the defaults.
    lines = wrapper.turn("Hello")
    assert lines[0]["model"] == DEFAULT_MODEL
    assert only(lines, "result")["result"] == "Still fine."
    assert lines[-1]["claude_session_id"] not in (None, unknown)


MCP_SERVER = """
import json, sys
TOOL = {"name": "shout", "description": "Upper-case the text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}}
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue  # a notification
    method = msg.get("method")
    if method == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"],
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "shout", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [TOOL]}
    elif method == "tools/call":
        text = msg["params"]["arguments"]["text"] + "!" * int(__import__("os").environ["BANG"])
        result = {"content": [{"type": "text", "text": text.upper()}]}
    else:
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"],
                          "error": {"code": -32601, "message": method}}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}), flush=True)
"""


def test_it_connects_configured_mcp_servers(
    api: MessagesAPI, start_wrapper: Callable[..., Wrapper], tmp_path: Path
) -> None:
    script = tmp_path / "mcp_server.py"
    script.write_text(MCP_SERVER)
    tool = ToolUse("mcp__shouter__shout", {"text": "hi"})
    api.script(tool, Text("Shouted."))
    wrapper = start_wrapper()
    server = {"command": sys.executable, "args": [str(script)], "env": {"BANG": "2"}}
    wrapper.send(type="configure", mcpServers={"shouter": server})

    configured = wrapper.read_until("configured")[-1]
    assert configured["mcpServers"]["shouter"]["env"] == {"BANG": "***"}  # env values masked

    lines = wrapper.turn("Shout hi")
    assert {"name": "shouter", "status": "connected"}.items() <= lines[0]["mcp_servers"][0].items()
    (tool_result,) = blocks(lines, "user", "tool_result")
    assert text_of(tool_result["content"]) == "HI!!"


def test_it_reports_a_missing_api_key_and_exits_non_zero(
    start_wrapper: Callable[..., Wrapper], wrapper_env: dict[str, str]
) -> None:
    env = {k: v for k, v in wrapper_env.items() if k != "ANTHROPIC_API_KEY"}
    wrapper = start_wrapper(env, expect_ready=False)

    (error,) = wrapper.read_until("error")
    assert "ANTHROPIC_API_KEY" in error["message"]
    assert wrapper.wait() != 0


# ---------------------------------------------------------------- inside the embedded server


async def test_it_runs_in_an_embedded_sandboxs_container(api: MessagesAPI, tmp_path: Path) -> None:
    """The server runs the wrapper in the sandbox's bubblewrap container: the CLI (from the
    read-only virtualenv) reaches the model API over the host's network, keeps its state in the
    workspace, and its tools run as the sandbox's user."""
    from tests.conftest import start_localsandbox, stop_localsandbox
    from tests.localsandbox.helpers import Stream, api_client, stream_url

    api.script(ToolUse("Bash", {"command": "id -u; echo $HOME; pwd"}), Text("Looked."))
    server = start_localsandbox(tmp_path / "ws", extra_args=["--agent", "claude"])
    try:
        async with api_client(server) as client:
            envs = {
                "ANTHROPIC_BASE_URL": api.base_url,
                "ANTHROPIC_API_KEY": "sk-ant-test-not-a-real-key",
                **MessagesAPI.cli_env(),
            }
            created = await client.post("/sandboxes", json={"envs": envs})
            sandbox_id = created.json()["sandboxID"]
            assert created.json()["metadata"]["agent"] == "claude"
            agent = await client.post(
                f"/sandboxes/{sandbox_id}/agent", json={"prompt": "Look around"}
            )
            assert agent.status_code == 201, agent.text
            stream = await Stream.open(
                stream_url(server, sandbox_id, agent.json()["sessionID"], "agent")
            )
            await stream.wait_for(
                lambda s: any(e["type"] == "turn_complete" for e in s.events()), timeout=60
            )
            lines = stream.events()
            assert only(lines, "result")["result"] == "Looked."
            (tool_result,) = blocks(lines, "user", "tool_result")
            uid, home, cwd = text_of(tool_result["content"]).split()
            assert int(uid) != 0 and home == cwd == "/workspace"
            assert (server.workspaces_dir / sandbox_id / "workspace" / ".claude").is_dir()
            await stream.close()
    finally:
        stop_localsandbox(server)
