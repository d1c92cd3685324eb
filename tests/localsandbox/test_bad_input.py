"""Bad input gets a clear error envelope and breaks nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import LocalSandbox
from tests.localsandbox.helpers import Stream, start_exec, stream_url, wait_session_exited


def assert_error(response: httpx.Response, status: int, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert mentions.lower() in body["error"].lower()


async def assert_still_serving(api: httpx.AsyncClient, sandbox_id: str) -> None:
    response = await api.get(f"/sandboxes/{sandbox_id}")
    assert response.status_code == 200 and response.json()["status"] == "running"


@pytest.fixture
async def agent_id(api: httpx.AsyncClient, sandbox_id: str) -> str:
    response = await api.post(f"/sandboxes/{sandbox_id}/agent", json={})
    assert response.status_code == 201, response.text
    return response.json()["sessionID"]


async def test_it_rejects_a_malformed_json_body(api: httpx.AsyncClient, sandbox_id: str) -> None:
    response = await api.post(
        f"/sandboxes/{sandbox_id}/exec",
        content=b'{"cmd": "echo",',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "not valid JSON")
    await assert_still_serving(api, sandbox_id)


async def test_it_rejects_a_json_body_that_is_not_an_object(api: httpx.AsyncClient) -> None:
    assert_error(await api.post("/sandboxes", json=["templateID"]), 400, "JSON object")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/sandboxes", {"timeout": "soon"}, "timeout"),
        ("/sandboxes", {"timeout": -1}, "timeout"),
        ("/sandboxes", {"envs": {"A": 1}}, "envs"),
        ("/sandboxes", {"metadata": ["a"]}, "metadata"),
        ("/sandboxes", {"templateID": 7}, "templateID"),
        ("/sandboxes/{sandbox}/exec", {"cmd": ["ls"]}, "cmd"),
        ("/sandboxes/{sandbox}/exec", {"cmd": "ls", "args": "-la"}, "args"),
        ("/sandboxes/{sandbox}/exec", {"cmd": "ls", "timeout": True}, "timeout"),
        ("/sandboxes/{sandbox}/agent", {"prompt": 42}, "prompt"),
        ("/sandboxes/{sandbox}/agent", {"maxTurns": "many"}, "maxTurns"),
        ("/sandboxes/{sandbox}/agent", {"allowedTools": "Bash"}, "allowedTools"),
        ("/sandboxes/{sandbox}/agent", {"mcpServers": []}, "mcpServers"),
        ("/sandboxes/{sandbox}/agent/{agent}/prompt", {"text": 5}, "text"),
        ("/sandboxes/{sandbox}/agent/{agent}/prompt", {"text": None}, "text"),
        ("/sandboxes/{sandbox}/agent/{agent}/prompt", {}, "text"),
        ("/sandboxes/{sandbox}/agent/{agent}/kill", {"signal": "KILL"}, "signal"),
        ("/sandboxes/{sandbox}/agent/{agent}/kill", {"signal": 999}, "signal"),
    ],
)
async def test_it_rejects_wrong_json_types_naming_the_field(
    api: httpx.AsyncClient, sandbox_id: str, agent_id: str, path: str, body: Any, field: str
) -> None:
    url = path.format(sandbox=sandbox_id, agent=agent_id)
    assert_error(await api.post(url, json=body), 400, f"`{field}`")
    await assert_still_serving(api, sandbox_id)


async def test_it_rejects_a_command_that_cannot_start(
    api: httpx.AsyncClient, sandbox_id: str
) -> None:
    missing = await api.post(f"/sandboxes/{sandbox_id}/exec", json={"cmd": "no-such-command-x"})
    assert_error(missing, 400, "no-such-command-x")
    bad_cwd = await api.post(f"/sandboxes/{sandbox_id}/exec", json={"cmd": "ls", "cwd": "nope"})
    assert_error(bad_cwd, 400, "cwd")


async def test_it_answers_404_for_an_unknown_sandbox(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/sandboxes/sb-missing"), 404, "sb-missing")
    assert_error(await api.delete("/sandboxes/sb-missing"), 404)
    assert_error(await api.post("/sandboxes/sb-missing/exec", json={"cmd": "ls"}), 404)
    assert_error(await api.post("/sandboxes/sb-missing/agent", json={}), 404)
    assert_error(await api.get("/sandboxes/sb-missing/agent"), 404)


async def test_it_answers_404_for_an_unknown_session(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    base = f"/sandboxes/{sandbox_id}"
    assert_error(await api.post(f"{base}/exec/ses-missing/kill", json={}), 404, "ses-missing")
    assert_error(await api.post(f"{base}/agent/ses-missing/prompt", json={"text": "x"}), 404)
    assert_error(await api.post(f"{base}/agent/ses-missing/interrupt"), 404)
    # An exec session is not an agent session.
    exec_session = await start_exec(api, sandbox_id, "true")
    prompt = await api.post(f"{base}/agent/{exec_session['sessionID']}/prompt", json={"text": "x"})
    assert_error(prompt, 404, "agent session")

    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(stream_url(localsandbox, sandbox_id, "ses-missing"))
    assert refused.value.response.status_code == 404


async def test_it_answers_404_for_an_unknown_path(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    assert_error(await api.get("/nothing-here"), 404)
    assert_error(await api.get(f"/sandboxes/{sandbox_id}/files/etc"), 404)
    async with httpx.AsyncClient() as bare:
        outside = await bare.get(localsandbox.api_url.removesuffix("/api") + "/admin/")
    assert_error(outside, 404)


async def test_it_answers_405_for_a_wrong_method(api: httpx.AsyncClient, sandbox_id: str) -> None:
    response = await api.put("/sandboxes", json={})
    assert_error(response, 405)
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}
    assert_error(await api.get(f"/sandboxes/{sandbox_id}/agent/ses-x/prompt"), 405)
    assert_error(await api.patch(f"/sandboxes/{sandbox_id}"), 405)


async def test_it_answers_413_for_a_body_over_the_limit(
    api: httpx.AsyncClient, sandbox_id: str, agent_id: str
) -> None:
    text = "x" * (1024 * 1024)
    response = await api.post(
        f"/sandboxes/{sandbox_id}/agent/{agent_id}/prompt", json={"text": text}
    )
    assert_error(response, 413, "exceeds")
    just_under = await api.post(
        f"/sandboxes/{sandbox_id}/agent/{agent_id}/prompt", json={"text": text[:1000]}
    )
    assert just_under.status_code == 204
    await assert_still_serving(api, sandbox_id)


async def test_it_answers_409_when_prompting_an_agent_that_exited(
    api: httpx.AsyncClient, sandbox_id: str
) -> None:
    created = await api.post(f"/sandboxes/{sandbox_id}/agent", json={"prompt": "exit 0"})
    session_id = created.json()["sessionID"]
    await wait_session_exited(api, sandbox_id, session_id)
    prompt = await api.post(
        f"/sandboxes/{sandbox_id}/agent/{session_id}/prompt", json={"text": "hello"}
    )
    assert_error(prompt, 409, "exited")
    assert_error(await api.post(f"/sandboxes/{sandbox_id}/agent/{session_id}/interrupt"), 409)
    # Killing what already ended is harmless.
    assert (await api.post(f"/sandboxes/{sandbox_id}/agent/{session_id}/kill")).status_code == 204


async def test_it_survives_a_client_that_sends_garbage_frames_then_vanishes(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str, agent_id: str
) -> None:
    url = stream_url(localsandbox, sandbox_id, agent_id)
    rude = await Stream.open(url)
    for frame in (b"", b"\xff", b"\x03\x00\x00\x00\x01", b"\x04"):
        await rude.connection.send(frame)
    rude.connection.transport.abort()

    polite = await Stream.open(url)
    await polite.send_stdin(b'{"type": "prompt", "text": "still here"}\n')
    await polite.wait_for(lambda s: any(e["type"] == "turn_complete" for e in s.events()))
    assert polite.exit_code is None
    await assert_still_serving(api, sandbox_id)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/sandboxes", {"envs": {"A": "x\u0000y"}}, "envs"),
        ("/sandboxes", {"envs": {"A\u0000B": "x"}}, "envs"),
        ("/sandboxes", {"envs": {"A=B": "x"}}, "envs"),
        ("/sandboxes", {"envs": {"": "x"}}, "envs"),
        ("/sandboxes/{sandbox}/exec", {"cmd": "echo", "envs": {"A": "\u0000"}}, "envs"),
        ("/sandboxes/{sandbox}/exec", {"cmd": "echo", "args": ["a\u0000b"]}, "args"),
        ("/sandboxes/{sandbox}/exec", {"cmd": "ec\u0000ho"}, "cmd"),
        ("/sandboxes/{sandbox}/exec", {"cmd": "echo", "cwd": "a\u0000b"}, "cwd"),
    ],
)
async def test_it_refuses_what_no_process_could_be_given_when_it_is_given(
    api: httpx.AsyncClient, sandbox_id: str, path: str, body: dict[str, Any], field: str
) -> None:
    """NUL cannot be in an argument or an environment variable: say so at once, not at every
    exec later."""
    assert_error(await api.post(path.format(sandbox=sandbox_id), json=body), 400, field)
    await assert_still_serving(api, sandbox_id)


@pytest.mark.parametrize("path", ["/sandboxes", "/sandboxes/{sandbox}/agent"])
async def test_it_answers_400_for_deeply_nested_json(
    api: httpx.AsyncClient, sandbox_id: str, path: str
) -> None:
    nested = '{"mcpServers": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = await api.post(
        path.format(sandbox=sandbox_id),
        content=nested.encode(),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "nested")
    # Deep, but within what JSON parsers and encoders take, is still refused past our own cap.
    deep = {"mcpServers": {"x": {"command": "c", "env": {}, "args": []}}}
    inner: dict[str, Any] = deep
    for _ in range(200):
        inner["more"] = {}
        inner = inner["more"]
    assert_error(await api.post(path.format(sandbox=sandbox_id), json=deep), 400, "nested")
    await assert_still_serving(api, sandbox_id)


async def test_it_answers_an_unexpected_failure_with_a_json_500_and_no_traceback(
    localsandbox: LocalSandbox, tmp_path: Any
) -> None:
    from dashboard.localsandbox import isolation
    from dashboard.localsandbox.server import AppConfig, LocalSandboxApp

    app = LocalSandboxApp(AppConfig(workspaces_dir=tmp_path, bwrap="/missing/bwrap"))
    assert app.isolation.mode == "unavailable"

    async def explode(request: Any) -> Any:
        raise RuntimeError("secret detail /srv/porthole/var Traceback")

    app.rest.router.add("GET", "/sandboxes", explode)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/api/sandboxes", "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 500
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    assert sent[1]["body"] == b'{"error": "internal server error"}'
    assert isolation.UNSAFE_SETTING == "LOCALSANDBOX_UNSAFE_NO_ISOLATION"
