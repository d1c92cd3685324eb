"""A loopback TCP proxy a test can cut, to lose an exec stream mid-flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class Proxy:
    port: int
    transports: list[asyncio.WriteTransport] = field(default_factory=list)

    def cut(self) -> None:
        """Abort every proxied connection (both sides, no close handshake)."""
        for transport in self.transports:
            transport.abort()
        self.transports.clear()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@asynccontextmanager
async def tcp_proxy(host: str, port: int) -> AsyncIterator[Proxy]:
    tasks: set[asyncio.Task[None]] = set()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection(host, port)
        proxy.transports += [client_w.transport, upstream_w.transport]
        for task in (
            asyncio.create_task(_pipe(client_r, upstream_w)),
            asyncio.create_task(_pipe(upstream_r, client_w)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy = Proxy(port=server.sockets[0].getsockname()[1])
    try:
        yield proxy
    finally:
        proxy.cut()
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
