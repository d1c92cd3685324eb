"""Credentials: the API key everywhere, a sandbox's token for that sandbox only."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import ROOT, LocalSandbox, start_localsandbox, stop_localsandbox
from tests.localsandbox.helpers import Stream, start_exec, stream_url


async def create_sandbox(api: httpx.AsyncClient) -> dict:
    response = await api.post("/sandboxes", json={})
    assert response.status_code == 201
    return response.json()


def refused_status(error: pytest.ExceptionInfo[websockets.InvalidStatus]) -> int:
    return error.value.response.status_code


async def test_it_refuses_rest_calls_without_the_right_key(
    localsandbox: LocalSandbox, sandbox_id: str
) -> None:
    async with httpx.AsyncClient(base_url=localsandbox.api_url) as anonymous:
        assert (await anonymous.get("/sandboxes")).status_code == 401
        assert (await anonymous.post("/sandboxes", json={})).status_code == 401
        wrong = await anonymous.get(f"/sandboxes/{sandbox_id}", headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401
        assert wrong.json() == {"error": "missing or invalid credentials"}
        right = await anonymous.get(
            f"/sandboxes/{sandbox_id}", headers={"X-API-Key": localsandbox.api_key}
        )
        assert right.status_code == 200


async def test_it_refuses_websockets_without_the_right_key(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "echo hi")
    for credentials in ("", "api_key=nope", "token=nope"):
        url = stream_url(localsandbox, sandbox_id, session["sessionID"], credentials=credentials)
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url)
        assert refused_status(refused) == 401
    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session["sessionID"]))
    assert await stream.wait_exit() == 0


async def test_it_accepts_a_sandbox_token_for_that_sandbox_only(
    localsandbox: LocalSandbox, api: httpx.AsyncClient
) -> None:
    mine, theirs = await create_sandbox(api), await create_sandbox(api)
    try:
        bearer = {"Authorization": f"Bearer {mine['token']}"}
        async with httpx.AsyncClient(base_url=localsandbox.api_url, headers=bearer) as client:
            assert (await client.get(f"/sandboxes/{mine['sandboxID']}")).status_code == 200
            own = await start_exec(client, mine["sandboxID"], "echo mine")
            assert (await client.get(f"/sandboxes/{theirs['sandboxID']}")).status_code == 401
            foreign = await client.post(
                f"/sandboxes/{theirs['sandboxID']}/exec", json={"cmd": "ls"}
            )
            assert foreign.status_code == 401
            # A token is no API key: listing or creating sandboxes needs the key.
            assert (await client.get("/sandboxes")).status_code == 401
            assert (await client.post("/sandboxes", json={})).status_code == 401

        token = f"token={mine['token']}"
        stream = await Stream.open(
            stream_url(localsandbox, mine["sandboxID"], own["sessionID"], credentials=token)
        )
        assert await stream.wait_exit() == 0
        theirs_session = await start_exec(api, theirs["sandboxID"], "echo theirs")
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(
                stream_url(
                    localsandbox,
                    theirs["sandboxID"],
                    theirs_session["sessionID"],
                    credentials=token,
                )
            )
        assert refused_status(refused) == 401
    finally:
        for sandbox in (mine, theirs):
            await api.delete(f"/sandboxes/{sandbox['sandboxID']}")


async def test_it_never_echoes_sandbox_envs(api: httpx.AsyncClient) -> None:
    created = await api.post("/sandboxes", json={"envs": {"SECRET_TOKEN": "hunter2"}})
    sandbox_id = created.json()["sandboxID"]
    try:
        fetched = await api.get(f"/sandboxes/{sandbox_id}")
        listed = await api.get("/sandboxes")
        for response in (created, fetched, listed):
            assert "hunter2" not in response.text
        # ...while the processes do get them.
        run = await api.post(
            f"/sandboxes/{sandbox_id}/exec/run",
            json={"cmd": "sh", "args": ["-c", "echo $SECRET_TOKEN; echo $HOME"]},
        )
        home = run.json()["stdout"].splitlines()[1]
        assert run.json()["stdout"].splitlines()[0] == "hunter2"
        assert home == "/workspace"  # inside the sandbox's container
    finally:
        await api.delete(f"/sandboxes/{sandbox_id}")


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[LocalSandbox]:
    server = start_localsandbox(tmp_path / "open", api_key="", env={"LOCALSANDBOX_API_KEY": ""})
    yield server
    stop_localsandbox(server)


async def test_it_asks_no_credentials_on_loopback_without_an_api_key(
    open_server: LocalSandbox,
) -> None:
    assert not open_server.api_url.endswith(":0/api")  # --port 0 reports the real port
    # Sandboxes with network share the host's loopback: the start says what that means.
    assert any("WARNING: no --api-key" in line for line in open_server.log)
    async with httpx.AsyncClient(base_url=open_server.api_url) as anonymous:
        created = await anonymous.post("/sandboxes", json={})
        assert created.status_code == 201
        assert (await anonymous.get("/sandboxes")).status_code == 200


def test_it_refuses_a_non_loopback_host_without_an_api_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "manage.py"),
            "localsandbox",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--api-key" in result.stderr
    assert "listening on" not in result.stdout
