"""Sandbox lifetimes: deletion, the idle timeout and server shutdown end every process."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LocalSandbox, start_localsandbox, stop_localsandbox
from tests.localsandbox.helpers import (
    Stream,
    api_client,
    eventually,
    host_pids_marked,
    process_alive,
    start_exec,
    stream_url,
    wait_session_exited,
)

# The shell prints its own pid and a background child's pid, then waits on the child.
TWO_PROCESSES = "sleep 300 & echo $$ $!; wait"


async def spawn_pids(server: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str) -> list[int]:
    """Start TWO_PROCESSES in the sandbox and return both pids (as the host numbers them)."""
    mark = secrets.token_hex(8)
    session = await start_exec(api, sandbox_id, TWO_PROCESSES, envs={"PH_MARK": mark})
    stream = await Stream.open(stream_url(server, sandbox_id, session["sessionID"]))
    await stream.wait_for(lambda s: s.output().endswith(b"\n"))
    await stream.close()
    pids = sorted(host_pids_marked(mark))
    assert len(pids) == 2 and all(process_alive(pid) for pid in pids)
    return pids


async def sandbox_status(api: httpx.AsyncClient, sandbox_id: str) -> str | None:
    """Read through the list, which (unlike GET of the sandbox) does not count as activity."""
    listed = (await api.get("/sandboxes")).json()
    return next((s["status"] for s in listed if s["sandboxID"] == sandbox_id), None)


async def wait_stopped(api: httpx.AsyncClient, sandbox_id: str) -> None:
    async def stopped() -> bool:
        return await sandbox_status(api, sandbox_id) == "stopped"

    await eventually(stopped, timeout=10, what=f"sandbox {sandbox_id} to stop")


async def test_it_ends_every_process_of_a_deleted_sandbox(
    localsandbox: LocalSandbox, api: httpx.AsyncClient
) -> None:
    sandbox_id = (await api.post("/sandboxes", json={})).json()["sandboxID"]
    pids = await spawn_pids(localsandbox, api, sandbox_id)
    workspace = localsandbox.workspaces_dir / sandbox_id / "workspace"
    assert workspace.is_dir()

    assert (await api.delete(f"/sandboxes/{sandbox_id}")).status_code == 204
    await eventually(lambda: not any(process_alive(pid) for pid in pids), what="processes gone")
    assert not workspace.exists()
    assert (await api.get(f"/sandboxes/{sandbox_id}")).status_code == 404


async def test_it_stops_an_idle_sandbox_after_its_timeout(
    localsandbox: LocalSandbox, api: httpx.AsyncClient
) -> None:
    created = await api.post("/sandboxes", json={"timeout": 1})
    sandbox_id = created.json()["sandboxID"]
    try:
        pids = await spawn_pids(localsandbox, api, sandbox_id)
        await wait_stopped(api, sandbox_id)
        await eventually(lambda: not any(process_alive(pid) for pid in pids), what="kills")

        exec_again = await api.post(f"/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
        assert exec_again.status_code == 409 and "stopped" in exec_again.json()["error"]
        agent_again = await api.post(f"/sandboxes/{sandbox_id}/agent", json={})
        assert agent_again.status_code == 409
        (session,) = (await api.get(f"/sandboxes/{sandbox_id}/exec")).json()
        assert (session["running"], session["exitCode"]) == (False, 128 + signal.SIGKILL)
    finally:
        await api.delete(f"/sandboxes/{sandbox_id}")


async def test_it_keeps_a_sandbox_with_an_attached_client_alive(
    localsandbox: LocalSandbox, api: httpx.AsyncClient
) -> None:
    watched = (await api.post("/sandboxes", json={"timeout": 1})).json()["sandboxID"]
    unwatched = ""
    try:
        session = await start_exec(api, watched, "exec sleep 300")
        viewer = await Stream.open(stream_url(localsandbox, watched, session["sessionID"]))
        await viewer.wait_for(lambda s: s.replay_end is not None)
        # Created after the watched sandbox was last touched, with the same timeout: once it
        # has stopped, the watched one is past its idle deadline too, and only its attached
        # client can be keeping it running.
        unwatched = (await api.post("/sandboxes", json={"timeout": 1})).json()["sandboxID"]
        await wait_stopped(api, unwatched)
        assert await sandbox_status(api, watched) == "running"

        await viewer.close()
        await wait_stopped(api, watched)
    finally:
        for sandbox_id in (watched, unwatched):
            if sandbox_id:
                await api.delete(f"/sandboxes/{sandbox_id}")


@pytest.fixture
async def own_server(tmp_path: Path) -> AsyncIterator[LocalSandbox]:
    server = start_localsandbox(tmp_path / "own")
    yield server
    if server.process.poll() is None:
        stop_localsandbox(server)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_it_kills_every_sandbox_process_when_told_to_stop(
    own_server: LocalSandbox, signum: signal.Signals
) -> None:
    async with api_client(own_server) as api:
        sandbox_id = (await api.post("/sandboxes", json={})).json()["sandboxID"]
        pids = await spawn_pids(own_server, api, sandbox_id)
        agent = await api.post(f"/sandboxes/{sandbox_id}/agent", json={"prompt": "sleep 300"})
        assert agent.status_code == 201

    own_server.process.send_signal(signum)
    assert await asyncio.to_thread(own_server.process.wait, 20) == 0
    await eventually(lambda: not any(process_alive(pid) for pid in pids), what="processes gone")


async def test_it_kills_the_commands_an_agent_started_when_the_agent_is_killed(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    # The demo runs each command in a process group of its own: killing only the agent's
    # group would leave this `sleep` behind.
    mark = secrets.token_hex(8)
    prompt = f"$ echo started > command.pid; PH_MARK={mark} exec sleep 300"
    created = await api.post(f"/sandboxes/{sandbox_id}/agent", json={"prompt": prompt})
    session_id = created.json()["sessionID"]
    pid_file = localsandbox.workspaces_dir / sandbox_id / "workspace" / "command.pid"
    await eventually(lambda: pid_file.exists() and host_pids_marked(mark), what="the command")
    (pid,) = host_pids_marked(mark)

    kill = await api.post(f"/sandboxes/{sandbox_id}/agent/{session_id}/kill", json={})
    assert kill.status_code == 204
    await eventually(lambda: not process_alive(pid), what="the agent's command to be killed")


async def test_it_kills_an_exec_session_that_outlives_its_timeout(
    api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "exec sleep 300", timeout=0.3)
    info = await wait_session_exited(api, sandbox_id, session["sessionID"])
    assert info["exitCode"] == 128 + signal.SIGKILL
    run = await api.post(
        f"/sandboxes/{sandbox_id}/exec/run",
        json={"cmd": "sh", "args": ["-c", "echo partial; exec sleep 300"], "timeout": 0.3},
    )
    assert run.status_code == 200
    assert (run.json()["exitCode"], run.json()["stdout"]) == (128 + signal.SIGKILL, "partial\n")
