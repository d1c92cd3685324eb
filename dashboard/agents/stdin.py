"""Lines to an agent's stdin through the bridge that holds its session, acknowledged.

Any worker may ask (`send_stdin`): the request goes to the `bridge.<session>` group with a
reply channel and an id; the bridge holding the lease checks its fence, writes the line on
its socket and answers (`acknowledge`). The request is repeated until a bridge answers (one
may be attaching right now); the id lets the bridge send the line once however often it is
asked. No answer in time means no bridge holds the session: the caller says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from channels.layers import get_channel_layer

from dashboard.agents.models import SessionId
from dashboard.agents.recording import bridge_group

ACK_TIMEOUT = 5.0  # how long a person's configure waits for a bridge to take it
ACK_RETRY = 0.5  # asked again this often meanwhile (a bridge may be attaching)
LATE_ANSWER = 1.0  # after the last request, how long an answer on its way is awaited


async def acknowledge(reply: object, problem: str | None) -> None:
    layer = get_channel_layer()
    if layer is None or not isinstance(reply, str) or not reply:
        return
    with contextlib.suppress(Exception):
        await layer.send(reply, {"type": "bridge.ack", "ok": problem is None, "problem": problem})


async def send_stdin(
    session_id: SessionId, line: dict[str, Any], *, wait: float = ACK_TIMEOUT
) -> str | None:
    """Ask the bridge holding a session to write a line to the agent's stdin; None once it
    acknowledged, else why not (no bridge answered in `wait` seconds, or it could not send).

    The request is repeated until a bridge answers (one may be attaching right now); its id
    lets the bridge send the line once however often it is asked.
    """
    layer = get_channel_layer()
    if layer is None:
        return "no channel layer is configured"
    reply = await layer.new_channel()
    request = {"type": "bridge.stdin", "line": line, "reply": reply, "id": uuid.uuid4().hex}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    answer: dict[str, Any] | None = None
    while answer is None and loop.time() < deadline:
        await layer.group_send(bridge_group(session_id), request)
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(
                layer.receive(reply), max(0.0, min(ACK_RETRY, deadline - loop.time()))
            )
    if answer is None:
        # A bridge may have taken the last request and be answering now: the caller's
        # fallback (REST for a first prompt) must not send the line a second time.
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(layer.receive(reply), LATE_ANSWER)
    if answer is None:
        return "no bridge holds this session right now"
    if answer.get("ok"):
        return None
    return str(answer.get("problem") or "the bridge could not send it")
