"""Requests on the wire match the official SDK's (opencomputer-sdk 1.1.0).

The embedded server cannot tell us the exact bytes it received, so both clients talk to a
recording loopback server here and the recorded requests are compared.
"""

from __future__ import annotations

import contextlib

import pytest
from opencomputer import Sandbox  # type: ignore[import-untyped]

from dashboard.opencomputer import OpenComputer, api_base, stream_url

from .loopback import Loopback, Reply, loopback

KEY = "k/ey+1"
SANDBOX = {"sandboxID": "sb-1", "status": "running", "templateID": "base"}
AGENT = {"sessionID": "as-1", "sandboxID": "sb-1", "running": True, "startedAt": "x"}
EXEC = {"sessionID": "es-1", "sandboxID": "sb-1", "command": "sh", "running": True}
ROUTES = {
    ("POST", "/api/sandboxes"): Reply(201, SANDBOX),
    ("GET", "/api/sandboxes/sb-1"): Reply(200, SANDBOX),
    ("POST", "/api/sandboxes/sb-1/agent"): Reply(201, AGENT),
    ("GET", "/api/sandboxes/sb-1/agent"): Reply(200, [AGENT]),
    ("POST", "/api/sandboxes/sb-1/agent/as-1/prompt"): Reply(204),
    ("POST", "/api/sandboxes/sb-1/agent/as-1/interrupt"): Reply(204),
    ("POST", "/api/sandboxes/sb-1/agent/as-1/kill"): Reply(204),
    ("POST", "/api/sandboxes/sb-1/exec"): Reply(201, EXEC),
    ("GET", "/api/sandboxes/sb-1/exec"): Reply(200, [EXEC]),
    ("POST", "/api/sandboxes/sb-1/exec/es-1/kill"): Reply(204),
    ("DELETE", "/api/sandboxes/sb-1"): Reply(204),
}


def last(server: Loopback, method: str, path: str) -> tuple[dict[str, str], object]:
    for request in reversed(server.requests):
        if (request.method, request.path) == (method, path):
            return request.headers, request.json() if request.body else None
    raise AssertionError(f"no {method} {path}")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:1", "http://h:1/api"),
        ("http://h:1/", "http://h:1/api"),
        ("http://h:1/api", "http://h:1/api"),
        ("http://h:1/api/", "http://h:1/api"),
        ("https://app.opencomputer.dev", "https://app.opencomputer.dev/api"),
    ],
)
def test_it_appends_api_like_the_sdk(given: str, expected: str) -> None:
    assert api_base(given) == expected


def test_it_builds_the_stream_url_with_a_quoted_key() -> None:
    assert (
        stream_url("https://h/api", "sb 1", "es/1", api_key="a/b+c&d")
        == "wss://h/api/sandboxes/sb%201/exec/es%2F1?api_key=a%2Fb%2Bc%26d"
    )
    assert stream_url("http://h/api/", "s", "e", kind="agent") == "ws://h/api/sandboxes/s/agent/e"
    oc = OpenComputer("http://h:1", "k", ws_url="ws://proxy:2/api/")
    assert oc.stream_url("s", "e") == "ws://proxy:2/api/sandboxes/s/exec/e?api_key=k"
    with pytest.raises(ValueError):
        stream_url("http://h/api", "", "e")


async def test_it_creates_sandboxes_like_the_sdk() -> None:
    options = {"envs": {"A": "1"}, "metadata": {"owner": "me"}, "memory_mb": 1024}
    async with loopback(ROUTES) as server:
        sdk = await Sandbox.create(
            template="py", timeout=60, api_key=KEY, api_url=server.url, **options
        )
        await sdk.close()
        sdk_headers, sdk_body = last(server, "POST", "/api/sandboxes")
        async with OpenComputer(server.url, KEY) as oc:
            info = await oc.create_sandbox("py", 60, **options)  # type: ignore[arg-type]
        headers, body = last(server, "POST", "/api/sandboxes")
    assert (
        body
        == sdk_body
        == {
            "templateID": "py",
            "timeout": 60,
            "envs": {"A": "1"},
            "metadata": {"owner": "me"},
            "memoryMB": 1024,
        }
    )
    assert headers["x-api-key"] == sdk_headers["x-api-key"] == KEY
    assert headers["x-oc-sdk-version"] == sdk_headers["x-oc-sdk-version"]
    assert headers["content-type"] == "application/json"
    assert info.sandbox_id == "sb-1" and info.template_id == "base"


async def test_it_sends_only_the_keys_that_are_set() -> None:
    async with loopback(ROUTES) as server, OpenComputer(server.url + "/api/", KEY) as oc:
        await oc.create_sandbox()
        assert last(server, "POST", "/api/sandboxes")[1] == {"templateID": "base", "timeout": 0}
        await oc.create_sandbox(cpu_count=2)
        assert last(server, "POST", "/api/sandboxes")[1] == {
            "templateID": "base",
            "timeout": 0,
            "cpuCount": 2,
        }
        await oc.start_agent("sb-1", prompt="hi", model="", max_turns=None)
        assert last(server, "POST", "/api/sandboxes/sb-1/agent")[1] == {"prompt": "hi"}


async def test_it_starts_agents_like_the_sdk() -> None:
    options = {
        "model": "claude-x",
        "system_prompt": "be brief",
        "allowed_tools": ["Bash", "Read"],
        "permission_mode": "acceptEdits",
        "max_turns": 3,
        "cwd": "/work",
        "mcp_servers": {"fs": {"command": "mcp-fs", "args": ["/"], "env": {"A": "1"}}},
    }
    async with loopback(ROUTES) as server:
        sdk = await Sandbox.connect("sb-1", api_key=KEY, api_url=server.url)
        with contextlib.suppress(Exception):  # the SDK then attaches to connectURL: none here
            await sdk.agent.start(prompt="do it", **options)
        await sdk.close()
        _, sdk_body = last(server, "POST", "/api/sandboxes/sb-1/agent")
        async with OpenComputer(server.url, KEY) as oc:
            info = await oc.start_agent("sb-1", prompt="do it", resume="claude-sess", **options)  # type: ignore[arg-type]
        headers, body = last(server, "POST", "/api/sandboxes/sb-1/agent")
    assert isinstance(sdk_body, dict) and isinstance(body, dict)
    assert body == {**sdk_body, "resume": "claude-sess"}
    assert set(body) == {
        "prompt",
        "model",
        "systemPrompt",
        "allowedTools",
        "permissionMode",
        "maxTurns",
        "cwd",
        "mcpServers",
        "resume",
    }
    assert "x-oc-sdk-version" not in headers
    assert info.session_id == "as-1" and info.running


async def test_it_starts_exec_sessions_like_the_sdk() -> None:
    async with loopback(ROUTES) as server:
        sdk = await Sandbox.connect("sb-1", api_key=KEY, api_url=server.url)
        with contextlib.suppress(Exception):  # the SDK then attaches: the recorder refuses
            await sdk.exec.start("sh", args=["-c", "echo"], env={"A": "1"}, cwd="/w", timeout=9)
        await sdk.close()
        _, sdk_body = last(server, "POST", "/api/sandboxes/sb-1/exec")
        async with OpenComputer(server.url, KEY) as oc:
            info = await oc.start_exec(
                "sb-1", "sh", ["-c", "echo"], envs={"A": "1"}, cwd="/w", timeout=9
            )
        _, body = last(server, "POST", "/api/sandboxes/sb-1/exec")
    assert body == sdk_body
    assert info.session_id == "es-1" and info.command == "sh"


async def test_it_steers_and_kills_on_the_documented_paths() -> None:
    async with loopback(ROUTES) as server, OpenComputer(server.url, KEY) as oc:
        await oc.send_prompt("sb-1", "as-1", "again")
        await oc.interrupt("sb-1", "as-1")
        await oc.kill_agent("sb-1", "as-1")
        await oc.kill_agent("sb-1", "as-1", signal=15)
        await oc.kill_exec("sb-1", "es-1", signal=2)
        await oc.kill_sandbox("sb-1")
        [agent] = await oc.list_agents("sb-1")
        [session] = await oc.list_exec("sb-1")
    seen = [(r.method, r.path, r.json() if r.body else None) for r in server.requests]
    assert seen[:6] == [
        ("POST", "/api/sandboxes/sb-1/agent/as-1/prompt", {"text": "again"}),
        ("POST", "/api/sandboxes/sb-1/agent/as-1/interrupt", None),
        ("POST", "/api/sandboxes/sb-1/agent/as-1/kill", {"signal": 9}),
        ("POST", "/api/sandboxes/sb-1/agent/as-1/kill", {"signal": 15}),
        ("POST", "/api/sandboxes/sb-1/exec/es-1/kill", {"signal": 2}),
        ("DELETE", "/api/sandboxes/sb-1", None),
    ]
    assert all(r.headers["x-api-key"] == KEY for r in server.requests)
    assert agent.session_id == "as-1" and session.session_id == "es-1"


async def test_it_quotes_ids_into_one_path_segment() -> None:
    async with loopback({}) as server, OpenComputer(server.url, KEY) as oc:
        with contextlib.suppress(Exception):
            await oc.get_sandbox("../agent?x=1")
        with pytest.raises(ValueError):
            await oc.get_sandbox("")
    assert server.requests[0].path == "/api/sandboxes/..%2Fagent%3Fx%3D1"


async def test_it_uses_an_injected_http_client_without_closing_it() -> None:
    import httpx

    async with loopback(ROUTES) as server, httpx.AsyncClient() as http:
        async with OpenComputer(server.url, KEY, http=http) as oc:
            info = await oc.get_sandbox("sb-1")
        assert not http.is_closed
        assert info.sandbox_id == "sb-1"
        assert server.requests[-1].headers["x-api-key"] == KEY
