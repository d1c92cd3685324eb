"""What the dashboard's async tests share: waiting on conditions, and viewers' sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.recording import NewEvent
from dashboard.asgi import application

ORIGIN = b"http://localhost"
# Channels' communicator waits 1 s for a handshake: less than a consumer's first queries can
# take while the whole suite runs on two cores beside its team-mode twin.
HANDSHAKE_TIMEOUT = 15.0


class Socket(WebsocketCommunicator):  # type: ignore[misc]
    """Channels' test communicator, with a handshake wait fit for a loaded machine."""

    async def connect(self, timeout: float = HANDSHAKE_TIMEOUT) -> tuple[bool, int | str | None]:
        return await super().connect(timeout)  # type: ignore[no-any-return]


@database_sync_to_async
def held_session(
    sandbox_id: str, session_id: str, *, owner: str, lease_seconds: float = 600, title: str = ""
) -> AgentSession:
    """A session of an upstream sandbox whose bridge lease `owner` holds, as the supervisor
    hands one to a `Bridge`."""
    sandbox = Sandbox.objects.create(upstream_id=sandbox_id)
    return AgentSession.objects.create(
        sandbox=sandbox,
        upstream_id=session_id,
        title=title,
        bridge_owner=owner,
        bridge_lease_until=timezone.now() + timedelta(seconds=lease_seconds),
    )


def said(text: str) -> NewEvent:
    """An agent's text, as the bridge hands it to the recorder."""
    data = {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}
    return NewEvent.from_line(Event.Source.AGENT, json.dumps(data), data)


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll an async condition until it holds; fail after `timeout` seconds."""

    async def poll() -> None:
        while not await condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


def session_cookie(client: Client) -> bytes | None:
    name = settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}".encode() if name in client.cookies else None


def cookie_for(user: User) -> bytes:
    client = Client()
    client.force_login(user)
    cookie = session_cookie(client)
    assert cookie is not None
    return cookie


async def communicator(
    path: str, user: User | None = None, *, cookie: bytes | None = None, origin: bytes = ORIGIN
) -> Socket:
    """A socket through the whole ASGI application (origin check, cookie auth), unopened."""
    headers = [(b"origin", origin), (b"host", b"localhost")]
    if user is not None:
        cookie = await database_sync_to_async(cookie_for)(user)
    if cookie is not None:
        headers.append((b"cookie", cookie))
    return Socket(application, path, headers=headers)


async def opened(path: str, user: User | None = None) -> Socket:
    socket = await communicator(path, user)
    connected, _ = await socket.connect()
    assert connected, path
    return socket
