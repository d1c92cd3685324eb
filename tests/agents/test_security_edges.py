"""The edges a hostile browser pokes at: the WebSocket origin (scheme, host and port), and
inputs that used to end in a 500 or a socket closed with 1011 and a traceback."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from dashboard.agents import access
from dashboard.agents.models import AgentSession, Sandbox
from dashboard.agents.workspace import run_in_sandbox
from dashboard.asgi import application
from tests.agents.helpers import Socket, communicator, cookie_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

NESTED = "[" * 200_000 + "]" * 200_000
NESTED_OBJECT = '{"a":' * 50_000 + "1" + "}" * 50_000


@database_sync_to_async
def _session() -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id="sb-edges")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-edges", title="edges")


async def _socket(path: str, user: User, *, origin: str, host: str) -> Socket:
    cookie = await database_sync_to_async(cookie_for)(user)
    headers = [(b"origin", origin.encode()), (b"host", host.encode()), (b"cookie", cookie)]
    return Socket(application, path, headers=headers)


# -- the origin --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "accepted"),
    [
        ("http://localhost:8000", "localhost:8000", True),
        ("http://localhost", "localhost", True),
        ("http://localhost:80", "localhost", True),
        ("http://localhost:9999", "localhost:8000", False),  # another server on this machine
        ("http://localhost", "localhost:8000", False),
        ("https://localhost:8000", "localhost:8000", False),  # another scheme
        ("http://127.0.0.1:8000", "localhost:8000", False),
        ("http://evil.example", "localhost", False),
        ("null", "localhost", False),
        ("http://localhost:8000", "evil.example:8000", False),  # a host not allowed at all
    ],
)
async def test_it_accepts_a_socket_only_from_this_very_origin(alice, origin, host, accepted):
    session = await _session()
    socket = await _socket(f"/ws/sessions/{session.id}/", alice, origin=origin, host=host)
    connected, _ = await socket.connect()
    assert connected == accepted
    if connected:
        await socket.disconnect()


async def test_it_accepts_a_socket_from_a_trusted_origin(alice, settings):
    """Behind a TLS proxy that says nothing: the operator lists the public origin."""
    settings.CSRF_TRUSTED_ORIGINS = ["https://porthole.example.org"]
    settings.ALLOWED_HOSTS = ["porthole.example.org"]
    session = await _session()
    for origin, accepted in (
        ("https://porthole.example.org", True),
        ("https://porthole.example.org:8443", False),
        ("http://porthole.example.org", True),  # the scheme the proxy forwards as
    ):
        socket = await _socket(
            f"/ws/sessions/{session.id}/", alice, origin=origin, host="porthole.example.org"
        )
        connected, _ = await socket.connect()
        assert connected == accepted, origin
        if connected:
            await socket.disconnect()


def _from_peer(peer: str) -> Any:
    """The application as reached from `peer` (the address the server puts in the scope)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return await application({**scope, "client": (peer, 40000)}, receive, send)

    return app


@pytest.mark.parametrize(
    ("peer", "trusted", "accepted"),
    [
        ("10.0.0.5", ["10.0.0.0/24"], {"https": True, "http": False}),
        # Anyone else's X-Forwarded-Proto means nothing, as on HTTP (dashboard.proxies).
        ("192.0.2.9", ["10.0.0.0/24"], {"https": False, "http": True}),
        ("10.0.0.5", [], {"https": False, "http": True}),
    ],
)
async def test_it_takes_the_scheme_only_from_a_trusted_proxy(
    alice, settings, peer, trusted, accepted
):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.PORTHOLE_TRUSTED_PROXIES = trusted
    settings.ALLOWED_HOSTS = ["porthole.example.org"]
    session = await _session()
    cookie = await database_sync_to_async(cookie_for)(alice)
    for scheme, expected in accepted.items():
        headers = [
            (b"origin", f"{scheme}://porthole.example.org".encode()),
            (b"host", b"porthole.example.org"),
            (b"x-forwarded-proto", b"https"),
            (b"cookie", cookie),
        ]
        socket = Socket(_from_peer(peer), f"/ws/sessions/{session.id}/", headers=headers)
        connected, _ = await socket.connect()
        assert connected == expected, scheme
        if connected:
            await socket.disconnect()


# -- no 500, no 1011 -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [NESTED, NESTED_OBJECT, '{"fs": {"command": "x", "type": [1]}}'])
def test_it_refuses_deeply_nested_mcp_servers_with_a_message(oc, alice, value):
    client = Client()
    client.force_login(alice)
    response = client.post(
        reverse("new_session"), {"prompt": "keep me", "sandbox": "new", "mcp_servers": value}
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "MCP servers" in html and "keep me" in html
    assert not AgentSession.objects.exists()


@pytest.mark.parametrize("via", ["member", "link"])
@pytest.mark.parametrize("junk", [NESTED, NESTED_OBJECT, "\ud800", "[]", "1e999999", '"x"'])
async def test_it_ignores_junk_on_the_session_socket_and_carries_on(alice, junk, via):
    session = await _session()
    if via == "member":
        socket = await communicator(f"/ws/sessions/{session.id}/", alice)
    else:
        _, token = await database_sync_to_async(access.create_share_link)(
            session, alice, label="", expiry="1d"
        )
        socket = await communicator(f"/ws/share/{token}/")
    assert (await socket.connect())[0]
    await socket.send_to(text_data=junk)
    await socket.send_json_to({"last_seq": 0})
    seen = ""
    while 'id="session-state"' not in seen:
        seen += await socket.receive_from(timeout=5)
    await socket.disconnect()


@pytest.mark.parametrize("junk", [NESTED, NESTED_OBJECT, '{"rows": "abc"}', '{"rows": [[[]]]}'])
async def test_it_ignores_junk_on_the_list_socket_and_carries_on(alice, junk):
    session = await _session()
    socket = await communicator("/ws/sessions/", alice)
    assert (await socket.connect())[0]
    await socket.send_to(text_data=junk)
    await socket.send_json_to({"rows": [str(session.id)]})
    assert f'id="row-{session.id}"' in await socket.receive_from(timeout=5)
    await socket.disconnect()


@pytest.mark.parametrize("path", ["/ws/nowhere/", "/ws/sessions/not-a-uuid/", "/", "/ws/share/"])
async def test_it_refuses_an_unknown_socket_path_cleanly(alice, path):
    socket = await communicator(path, alice)
    connected, code = await socket.connect()  # raised "No route found" before
    assert not connected
    assert code == 1000, "a plain refusal (WebsocketDenier), not 1011 for a server error"


async def _http(path: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path.decode(),
        "raw_path": path,
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    app = ApplicationCommunicator(application, scope)
    await app.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await app.receive_output(timeout=10)
    await app.wait(timeout=10)
    return int(start["status"])


@pytest.mark.parametrize(
    "path",
    [
        b"/static/%2e%2e/dashboard/settings.py",
        b"/static/../dashboard/settings.py",
        b"/static/%2e%2e/%2e%2e/etc/passwd",
        b"/static/..%2f..%2fetc/passwd",
    ],
)
async def test_it_answers_a_path_out_of_static_with_a_clean_4xx(db, path):
    status = await _http(path)
    assert 400 <= status < 500, status


async def test_it_still_serves_static_files(db):
    assert await _http(b"/static/porthole/app.css") == 200


# -- a viewer's look at a diff runs nothing the sandbox configured ---------------------------------

EVIL = """#!/bin/sh
touch "$(dirname "$0")/ran-$(basename "$0")"
if [ $# -eq 0 ]; then cat; elif [ $# -eq 1 ]; then cat "$1"; fi
exit 0
"""


def test_it_runs_no_git_config_commands_when_a_viewer_reads_a_diff(oc, bob):
    """The sandbox is hostile: its repository's config and attributes name commands that git
    runs while diffing. A viewer's GET of the Changes panel must not run them."""
    from tests.agents.test_reading_workspace import live_sandbox, session_in, write
    from tests.agents.test_rendering import add_event, assert_safe

    sandbox_id = live_sandbox(oc)
    code, cwd_bytes = async_to_sync(run_in_sandbox)(sandbox_id, "pwd", [])
    cwd = cwd_bytes.decode().strip()
    hooks = {
        "fsmonitor": "core.fsmonitor",
        "external": "diff.external",
        "textconv": "diff.evil.textconv",
        "clean": "filter.evil.clean",
    }
    script = " && ".join(
        [
            f"cd {cwd}",
            "git init -q .",
            "printf 'a\\n' > notes.py",
            "git add notes.py",
            "printf 'b\\n' > notes.py",
            "printf '*.py diff=evil filter=evil\\n' > .gitattributes",
            *(f"printf '%s' '{EVIL}' > {cwd}/{name} && chmod +x {cwd}/{name}" for name in hooks),
            *(f"git config {key} {cwd}/{name}" for name, key in hooks.items()),
        ]
    )
    code, output = async_to_sync(run_in_sandbox)(sandbox_id, "sh", ["-c", script])
    assert code == 0, output
    session = session_in(sandbox_id)
    add_event(session, "agent", write("t1", "Write", {"file_path": f"{cwd}/notes.py"}))

    client = Client()
    client.force_login(bob)  # a viewer
    url = reverse("workspace_file", args=[session.id])
    response = client.get(url, {"path": f"{cwd}/notes.py", "view": "diff"})
    assert response.status_code == 200
    shown = "".join(assert_safe(response.content.decode()).text)
    assert "-a\n+b" in shown, "still the diff of the index copy against the file"

    code, ran = async_to_sync(run_in_sandbox)(sandbox_id, "sh", ["-c", f"ls {cwd}"])
    assert not [name for name in ran.decode().split() if name.startswith("ran-")], ran


@pytest.mark.timeout(30)
def test_it_reads_no_fifo_left_at_a_changed_path(oc: Any, bob: User) -> None:
    """`head` on a FIFO blocks until the fetch times out: the panel answers at once instead."""
    from tests.agents.test_reading_workspace import live_sandbox, session_in, write
    from tests.agents.test_rendering import add_event

    sandbox_id = live_sandbox(oc)
    code, cwd_bytes = async_to_sync(run_in_sandbox)(sandbox_id, "pwd", [])
    path = cwd_bytes.decode().strip() + "/pipe.py"
    code, output = async_to_sync(run_in_sandbox)(sandbox_id, "mkfifo", [path])
    assert code == 0, output
    session = session_in(sandbox_id)
    add_event(session, "agent", write("t1", "Write", {"file_path": path}))

    client = Client()
    client.force_login(bob)
    url = reverse("workspace_file", args=[session.id])
    for view in ("content", "diff"):
        response = client.get(url, {"path": path, "view": view})
        assert response.status_code == 200
        assert "Could not reach" not in response.content.decode(), view
