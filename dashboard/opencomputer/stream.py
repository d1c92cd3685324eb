"""The exec WebSocket: one connection to a running (or finished) exec/agent session.

Every connect replays the session's scrollback, then a :class:`ScrollbackEnd`, then live
frames; a finished session ends with :class:`Exit` and the server closes. ``async for`` over
an :class:`ExecStream` yields typed frames in order and stops after ``Exit`` or when the
socket closes. ``exit_code is None`` afterwards (``closed_without_exit``) means the socket
went away before the process exited: reconnect to continue.

The URL carries the API key (``?api_key=``), so it is never put in a message or ``repr``
unredacted.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

if sys.platform != "win32":  # FIONREAD, for `unread_bytes`
    import fcntl
    import termios

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from .errors import ConnectionFailed, OpenComputerError, error_from_response, redact
from .frames import (
    Exit,
    ScrollbackEnd,
    ServerFrame,
    Stderr,
    Stdin,
    Stdout,
    decode_frame,
    encode_stdin,
)
from .lines import JSONLineAssembler, Line

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ConnectFunction",
    "ExecStream",
    "StreamOpener",
    "connect_stream",
    "stream_url",
    "ws_base_url",
]

#: The largest message accepted. Scrollback chunks can be 1 MiB and more plus the stream byte.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Anything called like :func:`websockets.asyncio.client.connect` (tests inject their own).
ConnectFunction = Callable[..., Awaitable[ClientConnection]]


def ws_base_url(api_base: str) -> str:
    """``http(s)://host/api`` → ``ws(s)://host/api`` (ws/wss URLs pass through)."""
    if api_base.startswith("https://"):
        return "wss://" + api_base[len("https://") :]
    if api_base.startswith("http://"):
        return "ws://" + api_base[len("http://") :]
    return api_base


def stream_url(
    api_base: str, sandbox_id: str, session_id: str, *, api_key: str = "", kind: str = "exec"
) -> str:
    """The exec WebSocket URL. It contains the key: treat it as a secret."""
    if kind not in ("exec", "agent"):
        raise ValueError(f"kind must be 'exec' or 'agent', not {kind!r}")
    url = (
        f"{ws_base_url(api_base.rstrip('/'))}/sandboxes/{_segment(sandbox_id)}"
        f"/{kind}/{_segment(session_id)}"
    )
    if api_key:
        url += f"?api_key={quote(api_key, safe='')}"
    return url


def _segment(value: str) -> str:
    if not value:
        raise ValueError("an id must be a non-empty string")
    return quote(value, safe="")


class ExecStream:
    """An open exec WebSocket. Iterate it for frames; it is also an async context manager."""

    def __init__(
        self,
        connection: ClientConnection,
        *,
        url: str = "",
        sandbox_id: str | None = None,
        session_id: str | None = None,
    ) -> None:
        self._ws = connection
        self.url = redact(url)  # for messages and logs; the key is masked
        self.sandbox_id = sandbox_id
        self.session_id = session_id
        self.exit_code: int | None = None
        self.scrollback_ended = False
        self.ended = False

    def __repr__(self) -> str:
        state = "ended" if self.ended else "open"
        return f"<ExecStream {self.url} {state} exit_code={self.exit_code!r}>"

    @property
    def closed_without_exit(self) -> bool:
        """The stream has ended and no ``Exit`` frame arrived (connection lost or closed)."""
        return self.ended and self.exit_code is None

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code once closed (1006 when the TCP connection just died)."""
        return self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._ws.close_reason

    @property
    def connection(self) -> ClientConnection:
        """The underlying ``websockets`` connection."""
        return self._ws

    def unread_bytes(self) -> int | None:
        """Bytes the server sent that wait unread in this socket's kernel receive queue, or
        ``None`` where that cannot be known (not Linux, no socket, already closed).

        A reader that falls behind sees this grow before the server's own buffer for it
        overflows: the OpenComputer server then drops live output for this client, saying
        nothing on the wire. Cheap (one system call): fit to ask after every frame.
        """
        if not sys.platform.startswith("linux"):
            return None
        sock = self._ws.transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            fd = sock.fileno()
            if fd < 0:
                return None
            answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return None
        return int(struct.unpack("i", answer)[0])

    def receive_buffer_bytes(self) -> int | None:
        """The kernel's receive buffer size for this socket (``SO_RCVBUF``), or ``None``."""
        sock = self._ws.transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        except OSError:
            return None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ServerFrame:
        frame = await self.recv()
        if frame is None:
            raise StopAsyncIteration
        return frame

    async def recv(self) -> ServerFrame | None:
        """The next server frame, or ``None`` once the stream has ended.

        Text messages, empty messages, unknown stream bytes and client-direction frames are
        skipped. After an ``Exit`` frame the stream ends and the socket is closed.
        """
        while not self.ended:
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                self.ended = True
                break
            if isinstance(message, str):
                continue
            frame = decode_frame(message)
            if frame is None or isinstance(frame, Stdin):
                continue
            if isinstance(frame, Exit):
                self.exit_code = frame.code
                self.ended = True
            elif isinstance(frame, ScrollbackEnd):
                self.scrollback_ended = True
            return frame
        await self.close()
        return None

    async def lines(
        self, assembler: JSONLineAssembler | None = None
    ) -> AsyncIterator[Line | Stderr | ScrollbackEnd | Exit]:
        """Frames with stdout reassembled into :class:`Line` objects.

        The assembler is flushed before ``Exit`` is yielded, so a last line without a newline
        still arrives.
        """
        assembler = assembler if assembler is not None else JSONLineAssembler()
        async for frame in self:
            if isinstance(frame, Stdout):
                for line in assembler.feed(frame.data):
                    yield line
                continue
            if isinstance(frame, Exit):
                for line in assembler.flush():
                    yield line
            yield frame
        # Ended without Exit: a partial last line stays in the assembler. It is incomplete,
        # and a reconnect replays it from scrollback (call ``assembler.reset()`` first).

    async def send_stdin(self, data: bytes | bytearray | memoryview | str) -> None:
        """Write to the process's stdin (``str`` is UTF-8 encoded)."""
        payload = data.encode("utf-8") if isinstance(data, str) else data
        try:
            await self._ws.send(encode_stdin(payload))
        except ConnectionClosed:
            raise ConnectionFailed("the exec stream is closed", url=self.url) from None

    async def send_line(self, obj: Mapping[str, Any]) -> None:
        """Write one JSON object plus ``\\n`` to stdin (the agent wrapper's input protocol)."""
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
        await self.send_stdin(line.encode("utf-8"))

    async def close(self) -> None:
        """Detach. The process keeps running; reconnecting replays its scrollback."""
        self.ended = True
        with contextlib.suppress(OSError, WebSocketException):
            await self._ws.close()

    def abort(self) -> None:
        """Drop the connection at once, without the closing handshake or reading what is
        still queued (``close`` waits for the server's close frame, which comes after all
        of that). For a reader that has fallen behind and will reconnect: the process keeps
        running and the replay brings back what was discarded, while the ring holds it."""
        self.ended = True
        self._ws.transport.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def connect_stream(
    url: str,
    *,
    secrets: Iterable[str | None] = (),
    sandbox_id: str | None = None,
    session_id: str | None = None,
    open_timeout: float | None = 10.0,
    max_size: int | None = DEFAULT_MAX_MESSAGE_BYTES,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float | None = 5.0,
    connect: ConnectFunction = ws_connect,
    **options: Any,
) -> ExecStream:
    """Open an exec WebSocket at ``url`` (any URL: tests route it through their own proxy).

    A rejected handshake raises the typed error for its status (401 → ``Unauthorized``, 404 →
    ``NotFound`` ...); anything else that prevents opening raises ``ConnectionFailed``.
    ``secrets`` are masked out of every message, in addition to ``api_key=``/``token=``.
    """
    secrets = tuple(secrets)
    shown = redact(url, secrets)
    try:
        connection = await connect(
            url,
            open_timeout=open_timeout,
            max_size=max_size,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            **options,
        )
    except InvalidStatus as exc:
        response = exc.response
        raise error_from_response(
            response.status_code,
            response.body,
            reason=response.reason_phrase,
            method="GET",
            url=shown,
            secrets=secrets,
        ) from None
    except OpenComputerError:
        raise
    except (OSError, TimeoutError, WebSocketException) as exc:
        detail = redact(str(exc) or type(exc).__name__, secrets)
        raise ConnectionFailed(
            f"cannot open the exec stream: {detail}", method="GET", url=shown
        ) from None
    return ExecStream(connection, url=shown, sandbox_id=sandbox_id, session_id=session_id)


class StreamOpener:
    """What ``OpenComputer.open_stream`` returns: ``await`` it or use it with ``async with``."""

    def __init__(self, factory: Callable[[], Awaitable[ExecStream]]) -> None:
        self._factory = factory
        self._stream: ExecStream | None = None

    def __await__(self) -> Generator[Any, None, ExecStream]:
        return self._factory().__await__()

    async def __aenter__(self) -> ExecStream:
        self._stream = await self._factory()
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            await self._stream.close()
