"""A stalled viewer under real Daphne: what its unread fragments cost, and for how long.

    .venv/bin/python bench/stalled_daphne.py [--seconds 75] [--kb-per-s 1000]

`bench/run.py` attaches viewers through `WebsocketCommunicator`, where nothing ever times
out. Here Porthole's ASGI application is served by Daphne (with `manage.py serve`'s
settings) on a loopback port, in this process, and two real WebSocket clients open the same
session page: a reader, and a *stalled* client that says hello and then never reads its
socket again (a tiny receive buffer, so the kernel holds little of the pile). Fragments are
published to the session's group at `--kb-per-s` (synthetic `session.events` messages,
through the real `SessionConsumer`; no bridge, no sandbox), and once a second the script
notes this process's RSS, the bytes waiting in Daphne's (Twisted's) send buffer for the
stalled client, whether that connection is still open, and the reader's latency.

Nothing is asserted; it prints a timeline and a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import rss  # noqa: E402

STAMP = re.compile(r'data-seq="(\d+)" data-t="([\d.]+)"')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=75.0, help="how long to publish (75)")
    parser.add_argument(
        "--kb-per-s", type=float, default=1000.0, help="fragment kilobytes per second (1000)"
    )
    parser.add_argument("--fragment", type=int, default=1000, help="characters per event (1000)")
    return parser.parse_args()


def _buffered(protocol: Any) -> int:
    """Bytes Twisted holds for this connection, not yet taken by the kernel."""
    transport = getattr(protocol, "transport", None)
    if transport is None:
        return 0
    data = getattr(transport, "dataBuffer", b"")
    offset = getattr(transport, "offset", 0)
    return len(data) - offset + getattr(transport, "_tempDataLen", 0)


def _stalled_client(port: int, path: str, cookie: str) -> socket.socket:
    """A WebSocket client that completes the handshake, says hello, then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://localhost\r\nCookie: {cookie}\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    if b" 101 " not in response.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"stalled client refused: {response!r}")
    payload = json.dumps({"last_seq": 0}).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


async def main(args: argparse.Namespace, server: Any) -> dict[str, Any]:
    from channels.db import database_sync_to_async
    from websockets.asyncio.client import connect

    from bench import porthole
    from dashboard.agents.recording import live_layer, session_group

    while not server.listening_addresses:
        await asyncio.sleep(0.05)
    port = server.listening_addresses[0][1]
    cookie = (await database_sync_to_async(porthole._user_and_cookie)()).decode()
    session = await database_sync_to_async(porthole._new_session)("sb-stalled-daphne")
    path = f"/ws/sessions/{session.id}/"
    layer = live_layer()

    reader = await connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers={"Cookie": cookie, "Origin": "http://localhost"},
        max_size=None,
    )
    await reader.send(json.dumps({"last_seq": 0}))
    stalled = await asyncio.to_thread(_stalled_client, port, path, cookie)
    stalled_port = stalled.getsockname()[1]
    await asyncio.sleep(0.5)

    latencies: list[tuple[float, float]] = []  # (received at, latency)

    async def read() -> None:
        async for message in reader:
            now = time.time()
            text = message if isinstance(message, str) else message.decode()
            latencies.extend((now, now - float(t)) for _, t in STAMP.findall(text))

    def stalled_protocol() -> Any | None:
        for protocol in server.connections:
            peer = getattr(getattr(protocol, "transport", None), "getPeer", None)
            if peer is not None and peer().port == stalled_port:
                return protocol
        return None

    reading = asyncio.create_task(read())
    group = session_group(session.id)
    per_message = 5  # events per published message
    interval = per_message * args.fragment / (args.kb_per_s * 1000)
    filler = "x" * args.fragment
    start_rss = rss()
    timeline: list[dict[str, float | bool]] = []
    seq = 0
    started = time.time()
    next_note = started + 1
    closed_at: float | None = None
    while time.time() - started < args.seconds:
        items = []
        for _ in range(per_message):
            seq += 1
            items.append(
                (seq, f'<article data-seq="{seq}" data-t="{time.time()}">{filler}</article>')
            )
        await layer.group_send(group, {"type": "session.events", "items": items})
        await asyncio.sleep(interval)
        if time.time() >= next_note:
            next_note += 1
            protocol = stalled_protocol()
            if protocol is None and closed_at is None:
                closed_at = time.time() - started
            recent = [lat for at, lat in latencies if at > time.time() - 1]
            timeline.append(
                {
                    "t": time.time() - started,
                    "rss_delta_mb": (rss() - start_rss) / 2**20,
                    "stalled_open": protocol is not None,
                    "stalled_buffer_mb": _buffered(protocol) / 2**20 if protocol else 0.0,
                    "reader_p50_ms": statistics.median(recent) * 1000 if recent else 0.0,
                    "published_mb": seq * args.fragment / 2**20,
                }
            )
            row = timeline[-1]
            print(
                f"t={row['t']:5.1f}s  published {row['published_mb']:6.1f} MB  "
                f"RSS +{row['rss_delta_mb']:6.1f} MB  stalled: "
                f"{'open' if row['stalled_open'] else 'closed'} "
                f"{row['stalled_buffer_mb']:6.1f} MB buffered  "
                f"reader p50 {row['reader_p50_ms']:.1f} ms",
                flush=True,
            )
    reading.cancel()
    await reader.close()
    stalled.close()
    await database_sync_to_async(porthole._cleanup)(session.id)
    return {
        "kb_per_s": args.kb_per_s,
        "seconds": args.seconds,
        "stalled_closed_after_s": closed_at,
        "peak_stalled_buffer_mb": max((r["stalled_buffer_mb"] for r in timeline), default=0),
        "peak_rss_delta_mb": max((r["rss_delta_mb"] for r in timeline), default=0),
        "reader_latency_p50_ms": statistics.median(lat for _, lat in latencies) * 1000,
        "timeline": timeline,
    }


def run() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="porthole-bench-daphne-") as scratch:
        from bench import porthole

        porthole.setup(Path(scratch), "http://127.0.0.1:9/api", "unused", None)
        # Import order matters to Twisted: daphne.server installs the asyncio reactor.
        from daphne.server import Server, twisted_loop
        from twisted.internet import reactor

        from dashboard.asgi import application

        # As `manage.py serve` builds it (ping_interval 20 s, ping_timeout 30 s: the defaults).
        server = Server(
            application=application,
            endpoints=["tcp:port=0:interface=127.0.0.1"],
            signal_handlers=False,
            websocket_timeout=86400,
            application_close_timeout=10,
        )
        outcome: dict[str, Any] = {}

        async def drive() -> None:
            try:
                outcome.update(await main(args, server))
            finally:
                reactor.stop()

        reactor.callWhenRunning(lambda: twisted_loop.create_task(drive()))
        server.run()
    if outcome:
        closed = outcome["stalled_closed_after_s"]
        fate = f"closed by Daphne after {closed:.0f} s" if closed else "never closed"
        print(
            f"\nstalled client: {fate}"
            f"; its send buffer peaked at {outcome['peak_stalled_buffer_mb']:.1f} MB; "
            f"RSS grew at most {outcome['peak_rss_delta_mb']:.1f} MB; "
            f"reader latency p50 {outcome['reader_latency_p50_ms']:.1f} ms"
        )


if __name__ == "__main__":
    run()
