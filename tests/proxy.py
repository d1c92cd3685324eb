"""A loopback TCP proxy a test controls: `cut()` drops every connection through it."""

from __future__ import annotations

import asyncio
import contextlib


class CuttableProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._writers.discard(writer)

    def cut(self) -> None:
        """Abort every open connection, as a network failure would (no close handshake)."""
        for writer in list(self._writers):
            transport = writer.transport
            if transport is not None:
                transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()


class ChaosProxy(CuttableProxy):
    """Cuts every connection through it at a random point: after a random number of bytes
    from the server (between `low` and `high`), as a flaky network would. Up to `limit`
    cuts; after that connections pass untouched, so a test ends."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        low: int = 4096,
        high: int = 262144,
        limit: int = 25,
        seed: int | None = None,
    ) -> None:
        super().__init__(target_host, target_port)
        import random

        self._random = random.Random(seed)
        self.low, self.high, self.limit = low, high, limit
        self.cuts = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        budget = self._random.randint(self.low, self.high) if self.cuts < self.limit else None
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._down(up_reader, writer, budget, (writer, up_writer))),
        ]
        self._writers |= {writer, up_writer}
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)

    async def _down(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        budget: int | None,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        sent = 0
        try:
            while data := await reader.read(65536):
                if budget is not None and sent + len(data) > budget:
                    writer.write(data[: budget - sent])
                    self.cuts += 1
                    for end in both:  # no close handshake: the connection just dies
                        if end.transport is not None:
                            end.transport.abort()
                    return
                sent += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._writers.discard(writer)
