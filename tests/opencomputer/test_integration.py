"""Our client against the embedded sandbox server, started for real (`localsandbox` fixture).

The same scenarios the official SDK's conformance covers, through our own client: sandboxes,
demo-agent turns read to `turn_complete`, follow-ups, interrupt, kill, scrollback replay of a
finished session, errors for bad credentials and unknown ids. No sleeps: every wait is a
condition with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dashboard.opencomputer import (
    ExecStream,
    Exit,
    JSONLineAssembler,
    Line,
    NotFound,
    OpenComputer,
    SandboxInfo,
    ScrollbackEnd,
    ServerFrame,
    Stderr,
    Stdout,
    Unauthorized,
)
from tests.conftest import LocalSandbox

from .tcpproxy import tcp_proxy

WAIT = 15.0


@pytest.fixture
async def oc(localsandbox: LocalSandbox) -> AsyncIterator[OpenComputer]:
    async with OpenComputer(localsandbox.api_url, localsandbox.api_key) as client:
        yield client


@pytest.fixture
async def sandbox(oc: OpenComputer) -> AsyncIterator[SandboxInfo]:
    info = await oc.create_sandbox(metadata={"suite": "opencomputer"})
    yield info
    with contextlib.suppress(NotFound):
        await oc.kill_sandbox(info.sandbox_id)


def of_type(kind: str) -> Callable[[Line], bool]:
    return lambda line: line.type == kind


def text_of(line: Line) -> str:
    """The text blocks of an assistant message."""
    message = (line.data or {}).get("message") or {}
    blocks = message.get("content") or []
    return "".join(b.get("text", "") for b in blocks if isinstance(b, dict))


class Transcript:
    """Reads an ExecStream, keeping every frame and reassembled stdout line."""

    def __init__(self, stream: ExecStream) -> None:
        self.stream = stream
        self.assembler = JSONLineAssembler()
        self.frames: list[ServerFrame] = []
        self.lines: list[Line] = []
        self.stderr = bytearray()
        self._checked = 0

    def types(self) -> list[str | None]:
        return [line.type for line in self.lines]

    def _take(self, frame: ServerFrame) -> None:
        self.frames.append(frame)
        if isinstance(frame, Stdout):
            self.lines += self.assembler.feed(frame.data)
        elif isinstance(frame, Stderr):
            self.stderr += frame.data
        elif isinstance(frame, Exit):
            self.lines += self.assembler.flush()

    async def until(self, predicate: Callable[[Line], bool], timeout: float = WAIT) -> Line:
        """The next line (after those already matched) for which ``predicate`` holds."""

        async def run() -> Line:
            while True:
                while self._checked < len(self.lines):
                    line = self.lines[self._checked]
                    self._checked += 1
                    if predicate(line):
                        return line
                frame = await self.stream.recv()
                if frame is None:
                    raise AssertionError(f"stream ended first; saw {self.types()}")
                self._take(frame)

        return await asyncio.wait_for(run(), timeout)

    async def until_end(self, timeout: float = WAIT) -> None:
        async def run() -> None:
            while (frame := await self.stream.recv()) is not None:
                self._take(frame)

        await asyncio.wait_for(run(), timeout)


# -- sandboxes ---------------------------------------------------------------------------


async def test_it_creates_gets_lists_and_kills_a_sandbox(oc: OpenComputer) -> None:
    info = await oc.create_sandbox(metadata={"owner": "tests"}, envs={"GREETING": "hi"})
    assert info.sandbox_id and info.status == "running"
    assert info.template_id == "base"
    assert info.metadata["owner"] == "tests"  # the server may add its own keys
    # The embedded server hands out what the Python SDK needs for its streams; never in repr.
    assert info.connect_url and info.token
    assert info.token not in repr(info)

    got = await oc.get_sandbox(info.sandbox_id)
    assert got.sandbox_id == info.sandbox_id and got.status == "running"
    assert info.sandbox_id in {s.sandbox_id for s in await oc.list_sandboxes()}

    await oc.kill_sandbox(info.sandbox_id)
    with pytest.raises(NotFound) as caught:
        await oc.get_sandbox(info.sandbox_id)
    assert caught.value.status == 404 and caught.value.message
    assert info.sandbox_id not in {s.sandbox_id for s in await oc.list_sandboxes()}
    with pytest.raises(NotFound):
        await oc.list_agents(info.sandbox_id)


# -- agent sessions ----------------------------------------------------------------------


async def test_it_runs_an_agent_turn_and_a_follow_up(
    oc: OpenComputer, sandbox: SandboxInfo
) -> None:
    sid = sandbox.sandbox_id
    agent = await oc.start_agent(sid, prompt="hello there\n$ echo porthole")
    assert agent.session_id and agent.sandbox_id == sid and agent.running

    async with oc.open_stream(sid, agent.session_id) as stream:
        transcript = Transcript(stream)
        init = await transcript.until(
            lambda line: line.type == "system" and (line.data or {}).get("subtype") == "init"
        )
        assert init.data is not None and init.data.get("session_id")
        said = await transcript.until(lambda line: "hello there" in text_of(line))
        assert said.type == "assistant"
        tool_use = await transcript.until(
            lambda line: (
                line.type == "assistant"
                and any(
                    isinstance(b, dict) and b.get("type") == "tool_use" and b.get("name") == "Bash"
                    for b in (line.data or {}).get("message", {}).get("content", [])
                )
            )
        )
        assert tool_use.data is not None
        await transcript.until(of_type("user"))
        result = await transcript.until(of_type("result"))
        assert result.data is not None and result.data.get("subtype") == "success"
        await transcript.until(of_type("turn_complete"))
        assert stream.scrollback_ended and stream.exit_code is None
        assert all(line.error is None for line in transcript.lines), transcript.lines

        first_turn = len(transcript.lines)
        await oc.send_prompt(sid, agent.session_id, "and again")
        await transcript.until(lambda line: "and again" in text_of(line))
        await transcript.until(of_type("result"))
        await transcript.until(of_type("turn_complete"))
        assert transcript.types()[first_turn:].count("turn_complete") == 1

    [listed] = [a for a in await oc.list_agents(sid) if a.session_id == agent.session_id]
    assert listed.running and listed.sandbox_id == sid
    assert agent.session_id in {s.session_id for s in await oc.list_exec(sid)}


async def test_it_interrupts_a_long_step_within_a_second(
    oc: OpenComputer, sandbox: SandboxInfo
) -> None:
    sid = sandbox.sandbox_id
    agent = await oc.start_agent(sid, prompt="sleep 30")
    async with oc.open_stream(sid, agent.session_id) as stream:
        transcript = Transcript(stream)
        await transcript.until(of_type("assistant"))  # the long step is under way
        loop = asyncio.get_running_loop()
        started = loop.time()
        await oc.interrupt(sid, agent.session_id)
        await transcript.until(of_type("interrupted"), timeout=5)
        assert loop.time() - started < 1.0
        assert stream.exit_code is None  # the session survives an interrupt


async def test_it_kills_an_agent_and_the_stream_ends_with_exit(
    oc: OpenComputer, sandbox: SandboxInfo
) -> None:
    sid = sandbox.sandbox_id
    agent = await oc.start_agent(sid, prompt="sleep 30")
    stream = await oc.open_stream(sid, agent.session_id)
    async with stream:
        transcript = Transcript(stream)
        await transcript.until(of_type("assistant"))
        await oc.kill_agent(sid, agent.session_id)
        await transcript.until_end()
    assert isinstance(transcript.frames[-1], Exit)
    assert stream.exit_code in (137, -9) and not stream.closed_without_exit
    [listed] = [a for a in await oc.list_agents(sid) if a.session_id == agent.session_id]
    assert not listed.running
    [info] = [s for s in await oc.list_exec(sid) if s.session_id == agent.session_id]
    assert info.exit_code == stream.exit_code and not info.running


async def test_it_replays_a_finished_session(oc: OpenComputer, sandbox: SandboxInfo) -> None:
    sid = sandbox.sandbox_id
    agent = await oc.start_agent(sid, prompt="first words\nexit 3")
    async with oc.open_stream(sid, agent.session_id) as live:
        first = Transcript(live)
        await first.until_end()
    assert live.exit_code == 3
    assert "first words" in "".join(text_of(line) for line in first.lines)

    # The agent path serves the same stream as the exec path.
    async with oc.open_stream(sid, agent.session_id, kind="agent") as replay:
        second = Transcript(replay)
        await second.until_end()
    kinds = [type(frame) for frame in second.frames]
    assert kinds[-2:] == [ScrollbackEnd, Exit]
    assert set(kinds[:-2]) <= {Stdout, Stderr}
    assert replay.exit_code == 3 and replay.scrollback_ended
    assert [line.text for line in second.lines] == [line.text for line in first.lines]
    assert bytes(second.stderr) == bytes(first.stderr)


async def test_it_reads_a_flood_to_turn_complete(oc: OpenComputer, sandbox: SandboxInfo) -> None:
    sid = sandbox.sandbox_id
    agent = await oc.start_agent(sid, prompt="flood 300 4000")
    async with oc.open_stream(sid, agent.session_id) as stream:
        transcript = Transcript(stream)
        await transcript.until(of_type("turn_complete"), timeout=30)
    assert all(line.error is None for line in transcript.lines)
    floods = [text_of(line) for line in transcript.lines if text_of(line).startswith("flood ")]
    # Every message, in order, each intact: lines spanning frames were reassembled.
    assert [text.split(" ", 2)[1] for text in floods] == [f"{i}/300" for i in range(1, 301)]
    assert {len(text) for text in floods} == {4000}


async def test_it_reports_a_failed_turn(oc: OpenComputer, sandbox: SandboxInfo) -> None:
    agent = await oc.start_agent(sandbox.sandbox_id, prompt="fail on purpose")
    async with oc.open_stream(sandbox.sandbox_id, agent.session_id) as stream:
        transcript = Transcript(stream)
        result = await transcript.until(of_type("result"))
        await transcript.until(of_type("turn_complete"))
    assert result.data is not None and result.data["is_error"] is True
    assert result.data["subtype"] == "error_during_execution"


async def test_it_configures_an_agent_over_stdin(oc: OpenComputer, sandbox: SandboxInfo) -> None:
    sid = sandbox.sandbox_id
    agent = await oc.start_agent(sid, prompt="hi")
    async with oc.open_stream(sid, agent.session_id) as stream:
        transcript = Transcript(stream)
        await transcript.until(of_type("turn_complete"))
        await oc.configure(sid, agent.session_id, model="claude-test-model", max_turns=2)
        await transcript.until(of_type("configured"))


# -- exec sessions -----------------------------------------------------------------------


async def test_it_runs_an_exec_session(oc: OpenComputer, sandbox: SandboxInfo) -> None:
    sid = sandbox.sandbox_id
    info = await oc.start_exec(sid, "sh", ["-c", "echo out; echo err >&2; exit 5"])
    assert info.session_id and info.command == "sh"
    async with oc.open_stream(sid, info.session_id) as stream:
        frames = await asyncio.wait_for(_all(stream), WAIT)
    stdout = b"".join(f.data for f in frames if isinstance(f, Stdout))
    stderr = b"".join(f.data for f in frames if isinstance(f, Stderr))
    assert (stdout, stderr, stream.exit_code) == (b"out\n", b"err\n", 5)
    assert ScrollbackEnd() in frames
    [listed] = [s for s in await oc.list_exec(sid) if s.session_id == info.session_id]
    assert (
        listed.exit_code == 5
        and not listed.running
        and listed.args == ("-c", "echo out; echo err >&2; exit 5")
    )


async def test_it_writes_stdin_and_kills_an_exec_session(
    oc: OpenComputer, sandbox: SandboxInfo
) -> None:
    sid = sandbox.sandbox_id
    info = await oc.start_exec(sid, "cat")
    async with oc.open_stream(sid, info.session_id) as stream:
        await stream.send_stdin("ping ü\n")
        echoed = bytearray()

        async def echo() -> None:
            while b"\n" not in echoed:
                frame = await stream.recv()
                assert frame is not None
                if isinstance(frame, Stdout):
                    echoed.extend(frame.data)

        await asyncio.wait_for(echo(), WAIT)
        assert bytes(echoed) == "ping ü\n".encode()
        await oc.kill_exec(sid, info.session_id, signal=15)
        rest = await asyncio.wait_for(_all(stream), WAIT)
    assert isinstance(rest[-1], Exit) and stream.exit_code in (143, -15)


async def _all(stream: ExecStream) -> list[ServerFrame]:
    return [frame async for frame in stream]


# -- losing the socket -------------------------------------------------------------------


async def test_it_notices_a_cut_socket_and_reattaches_with_a_replay(
    oc: OpenComputer, sandbox: SandboxInfo, localsandbox: LocalSandbox
) -> None:
    sid = sandbox.sandbox_id
    agent = await oc.start_agent(sid, prompt="sleep 30")
    host_port = localsandbox.api_url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    async with tcp_proxy(host, int(port)) as proxy:
        proxied = OpenComputer(
            localsandbox.api_url,
            localsandbox.api_key,
            http=oc.http,
            ws_url=f"ws://127.0.0.1:{proxy.port}/api",
        )
        stream = await proxied.open_stream(sid, agent.session_id)
        transcript = Transcript(stream)
        await transcript.until(of_type("assistant"))
        proxy.cut()
        await transcript.until_end()
    assert stream.closed_without_exit and stream.exit_code is None
    seen = [line.text for line in transcript.lines]

    async with oc.open_stream(sid, agent.session_id) as again:
        replay = Transcript(again)
        await replay.until(of_type("assistant"))
        await asyncio.wait_for(_until_scrollback_end(replay), WAIT)
        # The replay holds everything the cut stream saw (and maybe more); nothing is lost.
        assert [line.text for line in replay.lines][: len(seen)] == seen
        await oc.kill_agent(sid, agent.session_id)
        await replay.until_end()
    assert again.exit_code is not None


async def _until_scrollback_end(transcript: Transcript) -> None:
    while not transcript.stream.scrollback_ended:
        frame = await transcript.stream.recv()
        assert frame is not None
        transcript._take(frame)


# -- errors ------------------------------------------------------------------------------


async def test_it_rejects_bad_credentials_on_rest_and_stream(
    localsandbox: LocalSandbox, oc: OpenComputer, sandbox: SandboxInfo
) -> None:
    agent = await oc.start_agent(sandbox.sandbox_id, prompt="hi")
    wrong = "definitely-not-the-key"
    for key in (wrong, ""):
        async with OpenComputer(localsandbox.api_url, key) as bad:
            with pytest.raises(Unauthorized) as rest:
                await bad.list_sandboxes()
            with pytest.raises(Unauthorized):
                await bad.create_sandbox()
            with pytest.raises(Unauthorized) as ws:
                await bad.open_stream(sandbox.sandbox_id, agent.session_id)
        for error in (rest.value, ws.value):
            assert error.status == 401 and error.message
            if key:
                assert key not in str(error) and key not in repr(error)
        if key:
            assert "api_key=[redacted]" in str(ws.value)


async def test_it_raises_not_found_for_unknown_ids(oc: OpenComputer, sandbox: SandboxInfo) -> None:
    sid = sandbox.sandbox_id
    calls: list[Callable[[], Any]] = [
        lambda: oc.get_sandbox("sb-does-not-exist"),
        lambda: oc.kill_sandbox("sb-does-not-exist"),
        lambda: oc.start_agent("sb-does-not-exist", prompt="hi"),
        lambda: oc.list_agents("sb-does-not-exist"),
        lambda: oc.send_prompt(sid, "no-such-session", "hi"),
        lambda: oc.interrupt(sid, "no-such-session"),
        lambda: oc.kill_agent(sid, "no-such-session"),
        lambda: oc.kill_exec(sid, "no-such-session"),
        lambda: oc.open_stream(sid, "no-such-session"),
        lambda: oc.open_stream("sb-does-not-exist", "no-such-session"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as caught:
            await call()
        assert caught.value.status == 404 and caught.value.message
