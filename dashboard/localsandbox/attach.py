"""A WebSocket client attached to an exec session: replay, live output, stdin, exit.

Outbound: the scrollback snapshot (one frame per chunk), `0x04`, then live chunks as they
come, then `0x03` + exit code and a close. Inbound: `0x00` frames go to the process's stdin;
anything else (text, empty frames, unknown stream bytes) is ignored. A client leaving never
affects the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from dashboard.daphne_glue import WriteGate

from .processes import ExecSession
from .sandboxes import Sandbox
from .streams import SCROLLBACK_END_FRAME, STDIN, Chunk, Exited, Subscriber, exit_frame
from .web import Receive, Send

logger = logging.getLogger(__name__)


async def serve_attachment(
    sandbox: Sandbox, session: ExecSession, receive: Receive, send: Send
) -> None:
    """Run one accepted WebSocket until the session exits or the client goes away."""
    backlog, subscriber = session.hub.subscribe()
    session.attached_clients += 1
    sandbox.touch()
    outbound = asyncio.create_task(_send_output(backlog, subscriber, WriteGate(send), send))
    inbound = asyncio.create_task(_receive_stdin(sandbox, session, receive))
    try:
        await asyncio.wait({outbound, inbound}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (outbound, inbound):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.gather(outbound, inbound, return_exceptions=True)
        session.hub.unsubscribe(subscriber)
        if subscriber.dropped:
            # Nothing on the wire tells the client (as with OpenComputer): said here at least.
            logger.warning(
                "session %s: dropped %d live chunks for a client that read too slowly",
                session.session_id,
                subscriber.dropped,
            )
        session.attached_clients -= 1
        sandbox.touch()


async def _send_output(
    backlog: list[Chunk], subscriber: Subscriber, gate: WriteGate, send: Send
) -> None:
    async def send_frame(frame: bytes) -> None:
        await gate.wait()
        await send({"type": "websocket.send", "bytes": frame})

    for chunk in backlog:
        await send_frame(chunk.frame())
    await send_frame(SCROLLBACK_END_FRAME)
    while True:
        item = await subscriber.next()
        if isinstance(item, Exited):
            await send_frame(exit_frame(item.code))
            await send({"type": "websocket.close", "code": 1000})
            return
        await send_frame(item.frame())


async def _receive_stdin(sandbox: Sandbox, session: ExecSession, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if message["type"] != "websocket.receive" or not data or data[0] != STDIN:
            continue
        if len(data) > 1 and session.write_stdin(data[1:]):
            sandbox.touch()
            # Hold this client back (not the others) while the process is not reading.
            await session.stdin_writable()
