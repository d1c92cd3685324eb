"""The web server as Porthole runs it (`dashboard.webserver`): uvicorn, its options, and a
viewer that stops reading, which uvicorn's `send` would wait for."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import websockets
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from websockets.asyncio.client import ClientConnection as Connection

from dashboard.agents.models import AgentSession, Sandbox
from dashboard.agents.recording import publish, session_group
from dashboard.logs import SocketChatterFilter
from dashboard.webserver import OPTIONS, command_line, uvicorn_config
from tests.agents.helpers import cookie_for, wait_for

ROOT = Path(__file__).resolve().parents[2]
SEQ = re.compile(r'data-seq="(\d+)"')


def test_it_runs_team_workers_with_the_options_serve_runs_with() -> None:
    context = uvicorn.main.make_context("uvicorn", command_line("127.0.0.1", 8001)[1:])
    assert {name: context.params[name] for name in OPTIONS} == OPTIONS
    assert context.params["app"] == "dashboard.asgi:application"


def test_it_gives_every_deployment_file_the_same_command_line() -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert " ".join(command_line("127.0.0.1", 8001)) in guide
    compose = (ROOT / "deploy" / "compose" / "compose.yaml").read_text()
    web = re.search(r"web1:.*?command: (\[.*?\])", compose, re.DOTALL)
    assert web is not None
    assert json.loads(web.group(1)) == command_line("0.0.0.0", 8000)
    unit = (ROOT / "deploy" / "systemd" / "porthole-web@.service").read_text()
    start = re.search(r"^ExecStart=(.*?[^\\])$", unit.replace("\\\n", " "), re.MULTILINE)
    assert start is not None
    program, *args = shlex.split(start.group(1).replace("%i", "8001"))
    assert program.endswith("/uvicorn")
    assert ["uvicorn", *args] == command_line("127.0.0.1", 8001)


def test_it_keeps_idle_connections_open_longer_than_nginx_does() -> None:
    site = (ROOT / "deploy" / "nginx" / "porthole.conf").read_text()
    upstream = re.search(r"keepalive_timeout (\d+)s;", site)
    assert upstream is not None
    assert OPTIONS["timeout_keep_alive"] > int(upstream.group(1))


@dataclass
class Served:
    port: int
    server: uvicorn.Server

    def connections(self) -> int:
        return len(self.server.server_state.connections)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """The ASGI application under uvicorn with `manage.py serve`'s options, on loopback in
    this test's event loop (the in-memory layers are this process's)."""
    from dashboard.asgi import application

    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(application, "127.0.0.1", 0))
    serving = asyncio.create_task(server.serve(sockets=[listening]))

    async def started() -> bool:
        return server.started

    await wait_for(started, 10)
    try:
        yield Served(listening.getsockname()[1], server)
    finally:
        server.should_exit = True
        async with asyncio.timeout(20):
            await serving


@database_sync_to_async
def _session() -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id="sb-stall")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="ses-stall", title="stall")


async def _open(port: int, session: AgentSession, cookie: bytes, **options: Any) -> Connection:
    socket_ = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws/sessions/{session.id}/",
        additional_headers={"Origin": f"http://127.0.0.1:{port}", "Cookie": cookie.decode()},
        **options,
    )
    await socket_.send(json.dumps({"last_seq": 0}))
    return socket_


@pytest.mark.django_db(transaction=True)
async def test_it_never_lets_a_viewer_that_stopped_reading_hold_up_the_others(
    served: Served, alice: User
) -> None:
    port = served.port
    session = await _session()
    cookie = await database_sync_to_async(cookie_for)(alice)
    # The first to join the worker's feed, so the feed hands it each frame first. It reads
    # nothing: a small receive buffer and a queue of one message, so the server's send
    # buffer for it fills within the first few frames and uvicorn's `send` would wait.
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    await asyncio.get_running_loop().sock_connect(stuck, ("127.0.0.1", port))
    stalled = await _open(port, session, cookie, sock=stuck, max_queue=1, max_size=None)
    reader = await _open(port, session, cookie, max_size=None)
    # A viewer is sent nothing before its hello: a first frame says it was heard. The
    # events below are published only, never stored: the live stream is their one way in.
    async with asyncio.timeout(10):
        for socket_ in (stalled, reader):
            await socket_.recv()

    frames, sent = 40, 0
    received: list[int] = []
    payload = "x" * 500_000  # per frame: 20 MB in all, far past any socket buffer
    async with asyncio.timeout(60):
        while len(received) < frames:
            # At most a few frames ahead of the reader: the layer keeps what it is sent.
            while sent < frames and sent - len(received) < 4:
                sent += 1
                html = f'<p data-seq="{sent}">{payload}</p>'
                message = {"type": "session.events", "items": [[sent, html]]}
                await publish([(session_group(session.id), message)])
            frame = str(await reader.recv())
            received += [int(seq) for seq in SEQ.findall(frame)]
    assert received == list(range(1, frames + 1))
    await reader.close()
    stalled.transport.abort()


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []  # (the root's level then, the message)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("uvicorn", "websockets")):
            self.lines.append((logging.getLogger().level, record.getMessage()))


@pytest.mark.django_db(transaction=True)
async def test_it_logs_each_sockets_coming_and_going_only_when_debugging(
    served: Served, alice: User
) -> None:
    """uvicorn's INFO lines for every WebSocket (its handshake, "connection open" and, when
    it closes first, "connection closed") are left out at LOG_LEVEL=INFO: hundreds of
    viewers would fill the log with them. At DEBUG they are there."""
    session = await _session()
    cookie = await database_sync_to_async(cookie_for)(alice)
    root = logging.getLogger()
    kept, old_level = _Kept(), root.level
    root.addHandler(kept)
    try:
        for level in (logging.INFO, logging.DEBUG):
            root.setLevel(level)
            socket_ = await _open(served.port, session, cookie)
            async with asyncio.timeout(10):
                await socket_.recv()  # heard: accepted and joined
            await socket_.close()

            async def gone() -> bool:  # the server has seen the connection's end
                return served.connections() == 0

            await wait_for(gone)
    finally:
        root.removeHandler(kept)
        root.setLevel(old_level)
    assert [message for level, message in kept.lines if level == logging.INFO] == []
    debugging = " | ".join(message for level, message in kept.lines if level == logging.DEBUG)
    assert f'"WebSocket /ws/sessions/{session.id}/" [accepted]' in debugging
    assert "connection open" in debugging
    # The server logs its side's close only when it closes first (not reached here).
    closed = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "connection closed", (), None)
    assert not SocketChatterFilter().filter(closed)
