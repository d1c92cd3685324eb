"""The official `opencomputer-sdk` drives the embedded server exactly as it drives the cloud."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from opencomputer import Sandbox
from opencomputer.agent import AgentEvent

from tests.conftest import LocalSandbox
from tests.localsandbox.helpers import api_client, eventually


@pytest.fixture
async def sandbox(localsandbox: LocalSandbox) -> AsyncIterator[Sandbox]:
    sandbox = await Sandbox.create(
        api_url=localsandbox.api_url, api_key=localsandbox.api_key, metadata={"purpose": "test"}
    )
    yield sandbox
    async with api_client(localsandbox) as api:
        await api.delete(f"/sandboxes/{sandbox.sandbox_id}")
    await sandbox.close()


def of_type(events: list[AgentEvent], kind: str) -> list[AgentEvent]:
    return [event for event in events if event.type == kind]


def texts(events: list[AgentEvent]) -> list[str]:
    return [
        block["text"]
        for event in of_type(events, "assistant")
        for block in event["message"]["content"]
        if block["type"] == "text"
    ]


async def test_it_creates_a_sandbox_the_sdk_can_use_and_reconnect_to(
    localsandbox: LocalSandbox, sandbox: Sandbox
) -> None:
    assert sandbox.status == "running"
    assert sandbox._connect_url == localsandbox.api_url
    assert sandbox._token
    async with api_client(localsandbox) as api:
        info = (await api.get(f"/sandboxes/{sandbox.sandbox_id}")).json()
    assert info["metadata"] == {"purpose": "test", "agent": "demo"}
    assert info["templateID"] == "base"

    again = await Sandbox.connect(
        sandbox.sandbox_id, api_url=localsandbox.api_url, api_key=localsandbox.api_key
    )
    assert (again._connect_url, again._token) == (sandbox._connect_url, sandbox._token)
    assert await again.is_running()
    await again.close()


async def test_it_runs_an_agent_turn_to_the_exit_frame(sandbox: Sandbox) -> None:
    events: list[AgentEvent] = []
    session = await sandbox.agent.start(
        prompt="Checking the workspace.\n$ echo conformance\nexit 0", on_event=events.append
    )
    assert await asyncio.wait_for(session.wait(), 20) == 0

    assert [e.type for e in events][:2] == ["ready", "system"]
    assert events[1]["subtype"] == "init" and events[1]["model"] == "demo"
    assert texts(events) == ["Checking the workspace."]
    (tool_use,) = [
        block
        for event in of_type(events, "assistant")
        for block in event["message"]["content"]
        if block["type"] == "tool_use"
    ]
    assert tool_use["name"] == "Bash" and tool_use["input"]["command"] == "echo conformance"
    (result,) = of_type(events, "user")[0]["message"]["content"]
    assert result["tool_use_id"] == tool_use["id"]
    assert (result["content"], result["is_error"]) == ("conformance", False)
    assert of_type(events, "result") == []  # `exit` leaves before any result


async def test_it_takes_follow_up_prompts_as_new_turns(sandbox: Sandbox) -> None:
    events: list[AgentEvent] = []
    session = await sandbox.agent.start(prompt="first answer", on_event=events.append)
    waiting = asyncio.create_task(session.wait())
    await eventually(lambda: len(of_type(events, "turn_complete")) == 1, what="first turn")
    session.send_prompt("second answer")
    await eventually(lambda: len(of_type(events, "turn_complete")) == 2, what="second turn")
    session.send_prompt("exit 0")
    assert await asyncio.wait_for(waiting, 20) == 0

    results = of_type(events, "result")
    assert [r["result"] for r in results] == ["first answer", "second answer"]
    assert all(r["subtype"] == "success" and r["is_error"] is False for r in results)
    # One agent process, one Claude session across turns.
    assert len({e["session_id"] for e in of_type(events, "system")}) == 1


async def test_it_interrupts_a_long_step_within_a_second(sandbox: Sandbox) -> None:
    events: list[AgentEvent] = []
    session = await sandbox.agent.start(prompt="sleep 30", on_event=events.append)
    waiting = asyncio.create_task(session.wait())
    await eventually(lambda: texts(events), what="the long step to start")

    interrupted_at = time.monotonic()
    session.interrupt()
    await eventually(lambda: of_type(events, "interrupted"), timeout=1.0, interval=0.005)
    assert time.monotonic() - interrupted_at < 1.0
    assert of_type(events, "result") == []

    await session.kill()
    assert await asyncio.wait_for(waiting, 10) == 128 + 9


async def test_it_kills_an_agent_and_ends_with_an_exit_frame(sandbox: Sandbox) -> None:
    session = await sandbox.agent.start(prompt="sleep 30")
    waiting = asyncio.create_task(session.wait())
    (info,) = await sandbox.agent.list()
    assert (info.session_id, info.running) == (session.session_id, True)

    await session.kill(signal=15)
    assert await asyncio.wait_for(waiting, 10) == 128 + 15
    (info,) = await sandbox.agent.list()
    assert info.running is False


async def test_it_replays_a_finished_session_to_a_late_attach(sandbox: Sandbox) -> None:
    session = await sandbox.agent.start(prompt="remember this\nexit 0")
    assert await asyncio.wait_for(session.wait(), 20) == 0

    listed = await sandbox.agent.list()
    assert [(s.session_id, s.running) for s in listed] == [(session.session_id, False)]
    replayed: list[AgentEvent] = []
    late = await sandbox.agent.attach(session.session_id, on_event=replayed.append)
    assert await asyncio.wait_for(late.wait(), 10) == 0
    assert [e.type for e in replayed] == ["ready", "system", "assistant"]
    assert texts(replayed) == ["remember this"]


async def test_it_deletes_the_sandbox_through_the_sdk(
    localsandbox: LocalSandbox, sandbox: Sandbox
) -> None:
    await sandbox.kill()
    async with api_client(localsandbox) as api:
        assert (await api.get(f"/sandboxes/{sandbox.sandbox_id}")).status_code == 404


async def test_it_runs_and_streams_commands_through_sdk_exec(sandbox: Sandbox) -> None:
    result = await sandbox.exec.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")

    stdout: list[bytes] = []
    session = await sandbox.exec.start(
        "sh", args=["-c", "read line; echo got:$line"], on_stdout=stdout.append
    )
    await session.send_stdin("hello\n")
    assert await asyncio.wait_for(session.done, 10) == 0
    assert b"".join(stdout) == b"got:hello\n"
    listed = await sandbox.exec.list()
    assert {s.command for s in listed} == {"sh"}
    assert all(s.exit_code is not None for s in listed)


async def test_it_accepts_the_sandbox_token_the_sdk_sends_on_data_calls(
    localsandbox: LocalSandbox, sandbox: Sandbox
) -> None:
    async with httpx.AsyncClient(
        base_url=sandbox._connect_url, headers={"Authorization": f"Bearer {sandbox._token}"}
    ) as data_client:
        response = await data_client.get(f"/sandboxes/{sandbox.sandbox_id}/agent")
    assert response.status_code == 200
    assert response.json() == []
