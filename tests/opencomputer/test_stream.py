"""ExecStream against a scripted local WebSocket server, for what the embedded server never
sends (text messages, unknown stream bytes, short exit payloads, odd handshake rejections)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from dashboard.opencomputer import (
    ConnectionFailed,
    Exit,
    Line,
    NotFound,
    ScrollbackEnd,
    ServerError,
    Stderr,
    Stdout,
    Unauthorized,
    connect_stream,
)
from dashboard.opencomputer.frames import (
    encode_exit,
    encode_scrollback_end,
    encode_stderr,
    encode_stdout,
)

Handler = Callable[[ServerConnection], Awaitable[None]]
KEY = "wskey/1"


@asynccontextmanager
async def ws_server(
    handler: Handler, reject: tuple[int, str, str] | None = None
) -> AsyncIterator[str]:
    def process_request(_: ServerConnection, request: Request) -> Response | None:
        if reject is None:
            return None
        status, content_type, body = reject
        headers = Headers({"Content-Type": content_type})
        return Response(status, "Rejected", headers, body.encode())

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/api/sandboxes/s/exec/e?api_key={KEY}"


async def test_it_yields_typed_frames_in_order_and_skips_the_rest() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(encode_stdout(b"old\n"))
        await ws.send("a text message")
        await ws.send(b"")
        await ws.send(b"\x09unknown")
        await ws.send(b"\x00client-direction")
        await ws.send(encode_stderr(b"log"))
        await ws.send(encode_scrollback_end())
        await ws.send(encode_stdout(b"new\n"))
        await ws.send(encode_exit(-9))
        await ws.send(encode_stdout(b"after exit is ignored"))
        await ws.wait_closed()

    async with ws_server(handler) as url, await connect_stream(url) as stream:
        assert not stream.scrollback_ended
        frames = [frame async for frame in stream]
        assert frames == [
            Stdout(b"old\n"),
            Stderr(b"log"),
            ScrollbackEnd(),
            Stdout(b"new\n"),
            Exit(-9),
        ]
        assert stream.exit_code == -9 and stream.ended and stream.scrollback_ended
        assert not stream.closed_without_exit
        assert await stream.recv() is None


async def test_it_distinguishes_a_close_without_exit() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(encode_stdout(b"partial"))
        await ws.close(1001, "going away")

    async with ws_server(handler) as url, await connect_stream(url) as stream:
        assert [frame async for frame in stream] == [Stdout(b"partial")]
        assert stream.exit_code is None and stream.closed_without_exit
        assert stream.close_code == 1001 and stream.close_reason == "going away"


async def test_it_ends_quietly_when_the_tcp_connection_dies() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(encode_stdout(b"x"))
        ws.transport.abort()

    async with ws_server(handler) as url, await connect_stream(url) as stream:
        assert [frame async for frame in stream] == [Stdout(b"x")]
        assert stream.closed_without_exit and stream.close_code == 1006


async def test_it_reports_a_short_exit_payload_as_unknown() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"\x03\x01")

    async with ws_server(handler) as url, await connect_stream(url) as stream:
        assert [frame async for frame in stream] == [Exit(-1)]
        assert stream.exit_code == -1 and not stream.closed_without_exit


async def test_it_accepts_frames_over_a_mebibyte() -> None:
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB

    async def handler(ws: ServerConnection) -> None:
        await ws.send(encode_stdout(big))
        await ws.send(encode_exit(0))

    async with ws_server(handler) as url, await connect_stream(url) as stream:
        frames = [frame async for frame in stream]
    assert frames == [Stdout(big), Exit(0)]


async def test_it_writes_stdin_and_json_lines() -> None:
    received: list[bytes | str] = []
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            received.append(message)
            if len(received) == 3:
                done.set()

    async with ws_server(handler) as url, await connect_stream(url) as stream:
        await stream.send_stdin(b"raw bytes")
        await stream.send_stdin("tëxt")
        await stream.send_line({"type": "prompt", "text": "héllo\nworld"})
        await asyncio.wait_for(done.wait(), 5)
    assert received[0] == b"\x00raw bytes"
    assert received[1] == b"\x00" + "tëxt".encode()
    line = received[2]
    assert isinstance(line, bytes) and line.startswith(b"\x00") and line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line[1:]) == {"type": "prompt", "text": "héllo\nworld"}


async def test_it_refuses_stdin_after_close() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with ws_server(handler) as url:
        stream = await connect_stream(url, secrets=[KEY])
        await stream.close()
        await stream.close()  # idempotent
        with pytest.raises(ConnectionFailed) as caught:
            await stream.send_stdin(b"x")
        assert KEY not in str(caught.value)
        assert [frame async for frame in stream] == []


@pytest.mark.parametrize(
    ("status", "content_type", "body", "cls", "message"),
    [
        (401, "application/json", '{"error":"invalid api key"}', Unauthorized, "invalid api key"),
        (404, "application/json", '{"error":"no such session"}', NotFound, "no such session"),
        (
            503,
            "text/html",
            "<h1>upstream down</h1>",
            ServerError,
            "503 Rejected: <h1>upstream down</h1>",
        ),
    ],
)
async def test_it_maps_a_rejected_handshake(
    status: int, content_type: str, body: str, cls: type[Exception], message: str
) -> None:
    async def handler(ws: ServerConnection) -> None:  # pragma: no cover - never reached
        pass

    async with ws_server(handler, reject=(status, content_type, body)) as url:
        with pytest.raises(cls) as caught:
            await connect_stream(url, secrets=[KEY])
    error = caught.value
    assert getattr(error, "status", None) == status
    assert getattr(error, "message", None) == message
    assert KEY not in str(error) and "api_key=[redacted]" in str(error)


async def test_it_connects_through_an_injected_connect_function() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send(encode_exit(3))

    async def recording_connect(url: str, **kwargs: Any) -> ClientConnection:
        seen.append((url, kwargs))
        return await ws_connect(url, **kwargs)

    async with ws_server(handler) as url:
        stream = await connect_stream(url, connect=recording_connect, max_size=None)
        assert [frame async for frame in stream] == [Exit(3)]
    assert seen[0][0] == url and seen[0][1]["max_size"] is None
    assert KEY not in repr(stream) and "[redacted]" in repr(stream)


async def test_it_reassembles_lines_and_flushes_before_exit() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(encode_stdout(b'{"type":"re'))
        await ws.send(encode_stdout(b'ady"}\n{"type":"tail"}'))
        await ws.send(encode_stderr(b"log"))
        await ws.send(encode_scrollback_end())
        await ws.send(encode_exit(0))

    async with ws_server(handler) as url, await connect_stream(url) as stream:
        items = [item async for item in stream.lines()]
    assert [item.type if isinstance(item, Line) else item for item in items] == [
        "ready",
        Stderr(b"log"),
        ScrollbackEnd(),
        "tail",
        Exit(0),
    ]
