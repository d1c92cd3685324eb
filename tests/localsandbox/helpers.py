"""Helpers for driving the embedded sandbox server over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import LocalSandbox

STDIN, STDOUT, STDERR, EXIT, SCROLLBACK_END = 0x00, 0x01, 0x02, 0x03, 0x04


async def eventually[T](
    probe: Callable[[], Awaitable[T | None] | T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def api_client(server: LocalSandbox, **headers: str) -> httpx.AsyncClient:
    auth = {"X-API-Key": server.api_key} if server.api_key else {}
    return httpx.AsyncClient(base_url=server.api_url, headers={**auth, **headers}, timeout=15)


def stream_url(
    server: LocalSandbox,
    sandbox_id: str,
    session_id: str,
    kind: str = "exec",
    credentials: str | None = None,
) -> str:
    query = credentials if credentials is not None else f"api_key={server.api_key}"
    return f"{server.ws_url}/sandboxes/{sandbox_id}/{kind}/{session_id}?{query}"


class Stream:
    """A raw WebSocket client recording every frame the server sends."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames: list[bytes] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Stream:
        return cls(await websockets.connect(url, max_size=None, **kwargs))

    async def _read(self) -> None:
        try:
            async for message in self.connection:
                assert isinstance(message, bytes), "the server only sends binary frames"
                self.frames.append(message)
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._changed.set()

    async def wait_for(self, predicate: Callable[[Stream], bool], timeout: float = 10.0) -> None:
        async def watch() -> None:
            while not predicate(self):
                if self.closed.is_set():
                    raise AssertionError(f"stream closed first; frames: {self.frames[-5:]!r}")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        await self.wait_for(lambda s: s.exit_code is not None, timeout)
        assert self.exit_code is not None
        return self.exit_code

    async def send_stdin(self, data: bytes) -> None:
        await self.connection.send(bytes((STDIN,)) + data)

    async def close(self) -> None:
        await self.connection.close()
        await self._reader

    @property
    def replay_end(self) -> int | None:
        """Index of the 0x04 frame, if it has arrived."""
        return next((i for i, f in enumerate(self.frames) if f[:1] == b"\x04"), None)

    @property
    def exit_code(self) -> int | None:
        for frame in self.frames:
            if frame[0] == EXIT:
                code: int = struct.unpack(">i", frame[1:5])[0]
                return code
        return None

    def output(self, stream: int = STDOUT, *, start: int = 0, end: int | None = None) -> bytes:
        return b"".join(f[1:] for f in self.frames[start:end] if f[0] == stream)

    def replayed(self, stream: int = STDOUT) -> bytes:
        return self.output(stream, end=self.replay_end)

    def live(self, stream: int = STDOUT) -> bytes:
        end = self.replay_end
        return self.output(stream, start=(end + 1) if end is not None else len(self.frames))

    def events(self) -> list[dict[str, Any]]:
        """Complete stdout JSON lines (an agent session's events)."""
        lines = self.output().split(b"\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]


async def start_exec(
    client: httpx.AsyncClient, sandbox_id: str, script: str, **body: Any
) -> dict[str, Any]:
    response = await client.post(
        f"/sandboxes/{sandbox_id}/exec", json={"cmd": "sh", "args": ["-c", script], **body}
    )
    assert response.status_code == 201, response.text
    info: dict[str, Any] = response.json()
    return info


async def session_info(
    client: httpx.AsyncClient, sandbox_id: str, session_id: str
) -> dict[str, Any]:
    response = await client.get(f"/sandboxes/{sandbox_id}/exec")
    assert response.status_code == 200, response.text
    sessions: list[dict[str, Any]] = response.json()
    return next(s for s in sessions if s["sessionID"] == session_id)


async def wait_session_exited(
    client: httpx.AsyncClient, sandbox_id: str, session_id: str, timeout: float = 15.0
) -> dict[str, Any]:
    async def exited() -> dict[str, Any] | None:
        info = await session_info(client, sandbox_id, session_id)
        return info if not info["running"] else None

    return await eventually(exited, timeout, what=f"session {session_id} to exit")


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # the latter: gone between open and read
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def host_pids_marked(mark: str) -> set[int]:
    """Host pids of the live processes whose environment holds `PH_MARK=<mark>`.

    Sandbox processes live in PID namespaces of their own, so the pids they print mean
    nothing out here; a mark in their environment finds them from the host's /proc.
    """
    needle = f"PH_MARK={mark}".encode()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and process_alive(int(entry.name)):
            found.add(int(entry.name))
    return found
