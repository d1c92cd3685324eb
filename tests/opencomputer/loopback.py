"""A tiny loopback HTTP server for what the embedded server cannot produce.

It answers from a script (status, headers, body per method and path) and records every
request, so tests can check error mapping for 429/503/non-JSON bodies and the exact request
bodies and headers the client puts on the wire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    413: "Payload Too Large",
    418: "I'm a teapot",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass
class Reply:
    status: int
    body: bytes | str | Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return json.dumps(self.body).encode(), "application/json"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Loopback:
    url: str
    routes: dict[tuple[str, str], Reply]
    requests: list[Request]


@asynccontextmanager
async def loopback(routes: dict[tuple[str, str], Reply] | None = None) -> AsyncIterator[Loopback]:
    state = Loopback(url="", routes=dict(routes or {}), requests=[])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                state.requests.append(Request(method, path, headers, body))
                reply = state.routes.get((method, path)) or Reply(404, {"error": "no route"})
                payload, content_type = reply.encoded()
                reason = reply.reason or REASONS.get(reply.status, "Status")
                head = [
                    f"HTTP/1.1 {reply.status} {reason}",
                    f"Content-Length: {len(payload)}",
                    f"Content-Type: {content_type}",
                ]
                head += [f"{k}: {v}" for k, v in reply.headers.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()
