"""Two things plain ASGI cannot express, asked of Daphne directly, with plain-ASGI fallbacks.

1. Refusing a WebSocket handshake with a chosen HTTP status (401, 404, 409): ASGI can only
   close before accepting, which Daphne always answers with 403.
2. Knowing when a WebSocket client reads too slowly: Daphne's `send` never waits, it appends
   to Twisted's unbounded send buffer. Twisted pauses a registered push producer when that
   buffer passes 64 KiB and resumes it once drained; tapping those calls gives real
   back-pressure, so the per-subscriber limit (and not memory) absorbs a stalled client.

Used by the embedded sandbox server only (its subscribers). Porthole's own consumers do
not rely on it: their viewers acknowledge what they received and the consumer stops at a
window (`dashboard/agents/viewers.py`). The sandbox server finds Daphne's protocol object
through the `send` callable Daphne hands the application
(`functools.partial(server.handle_reply, protocol)`). Under any other ASGI server, or if
that ever changes, it falls back to a plain close (403) and to "always writable".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]

logger = logging.getLogger(__name__)


def _daphne_protocol(send: Send) -> Any | None:
    # Middleware may wrap `send` (Channels' session middleware keeps the original as
    # `real_send` on the wrapper whose bound method it hands on): look through it.
    for _ in range(8):
        if isinstance(send, functools.partial) and send.args:
            return send.args[0]
        inner = getattr(getattr(send, "__self__", None), "real_send", None)
        if inner is None:
            return None
        send = inner
    return None


async def reject_websocket(send: Send, status: int, reason: str) -> None:
    """Refuse the handshake with HTTP `status` (Daphne) or a close before accept (others)."""
    protocol = _daphne_protocol(send)
    handshake = getattr(protocol, "handshake_deferred", None)
    server = getattr(protocol, "server", None)
    if protocol is not None and handshake is not None and server is not None:
        from autobahn.websocket.types import ConnectionDeny

        # What Daphne's own serverReject() does, with our status instead of 403.
        del protocol.handshake_deferred
        handshake.errback(ConnectionDeny(code=status, reason=reason[:200]))  # type: ignore[no-untyped-call]
        server.protocol_disconnected(protocol)
        return
    await send({"type": "websocket.close", "code": 1008})


class _ProducerTap:
    """Sits in the transport's producer slot and mirrors pause/resume into an asyncio.Event."""

    def __init__(self, writable: asyncio.Event, inner: Any | None) -> None:
        self._writable = writable
        self._inner = inner

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's interface
        self._writable.clear()
        if self._inner is not None:
            self._inner.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self._writable.set()
        if self._inner is not None:
            self._inner.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        self._writable.set()
        if self._inner is not None:
            self._inner.stopProducing()


class WriteGate:
    """`await gate.wait()` returns once the client's socket can take more data."""

    def __init__(self, send: Send) -> None:
        self._writable = asyncio.Event()
        self._writable.set()
        self._install(getattr(_daphne_protocol(send), "transport", None))

    def _install(self, transport: Any | None) -> None:
        if transport is None or not hasattr(transport, "registerProducer"):
            return
        try:
            current = getattr(transport, "producer", None)
            if current is None:
                transport.registerProducer(_ProducerTap(self._writable, None), True)
            elif getattr(transport, "streamingProducer", False):
                transport.producer = _ProducerTap(self._writable, current)
            if getattr(transport, "producerPaused", False):
                self._writable.clear()
        except Exception:  # never let an optimisation break a stream
            logger.exception("could not watch the WebSocket send buffer; continuing without")
            self._writable.set()

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    async def wait(self) -> None:
        await self._writable.wait()
