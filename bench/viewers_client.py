"""The viewers of `bench/fanout.py`: real WebSocket clients over loopback, in a process apart.

    .venv/bin/python bench/viewers_client.py --url ws://127.0.0.1:PORT/ws/sessions/ID/
                                             [--url …] --cookie COOKIE --viewers N

Each viewer is a browser tab as `static/porthole/app.js` makes it: it opens the socket, says
hello (`{"last_seq": 0}`), reads every frame, and acknowledges the last seq it holds every
250 events or within a second. It notes when each seq reached its socket (the kernel's time)
and when it was read, and whether seqs arrive once and in order. Parsing and acknowledging
cost this process, not the server's.

Commands on stdin, one JSON line each, answered by one JSON line (after `MARK`) on stdout:

- `{"cmd": "open"}`: open every viewer at once, each saying hello; answers once every
  socket is open and has its watcher list (the end of its catch-up): wall times, failures.
- `{"cmd": "expect", "started": {seq: t0}, "recording": {seq: t1}, "timeout": s}`: wait
  until every viewer holds the last seq → latencies (arrival − t0, read − t0, and arrival −
  t1, pooled over viewers), complete, in order.
- `{"cmd": "close"}`: close every viewer at once → wall time, failures.
- `{"cmd": "stats"}`: this process's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import resource
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import percentiles  # noqa: E402

MARK = "@@bench "
DATA_SEQ = re.compile(rb'data-seq="(\d+)"')
ACK_EVERY = 250  # as static/porthole/app.js
ACK_AFTER = 1.0
OPEN_TIMEOUT = 120.0
READ_SIZE = 256 * 1024
ANCILLARY_SIZE = 64
SO_TIMESTAMPNS = 35  # Linux's (asm-generic): each read says when its last bytes arrived
CLOSE_TIMEOUT = 60.0
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tab:
    """One tab's socket, spoken by hand: the handshake, then frames parsed straight from the
    bytes read. The `websockets` client cost ~41 µs of this process's CPU a frame (its
    futures, queues and per-message objects): at 100 viewers that was most of a core on a
    two-core machine, taken from the server being measured.

    Each read also takes the kernel's time of arrival (`SO_TIMESTAMPNS`): when the last of
    the bytes read reached this socket, whatever this process was doing then (for frames
    that came earlier in the same read, a bound: they arrived then or before). One process
    reading 300 sockets reads a hand-out's last frames milliseconds after they arrived (a
    browser apiece would not); both times are kept, `arrived` and `read`."""

    def __init__(self, url: str, cookie: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.headers = {"Cookie": cookie, "Origin": f"http://{parts.netloc}"}
        self.sock: socket.socket | None = None
        self.outbox = bytearray()  # what the socket did not take at once
        self.ended = False  # a close frame came and was answered: drop once that is out
        self.untimed = 0  # reads the kernel gave no time of arrival for
        self.buffer = bytearray()
        self.upgraded = False
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.fragments: list[bytes] = []
        self.arrived: dict[int, float] = {}  # seq → the kernel's time of arrival
        self.read: dict[int, float] = {}  # seq → when this process read it
        self.last = 0
        self.in_order = True
        self.duplicates = 0
        self.acked = 0
        self.ack_timer: asyncio.TimerHandle | None = None
        self.opened = asyncio.Event()
        self.settled = asyncio.Event()
        self.lost = asyncio.Event()
        self.close_sent = False
        self.close_received = False
        self.error: str | None = None
        self.progress = asyncio.Event()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (self.host, self.port)), OPEN_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - counted as a failure
            sock.close()
            self._fail(repr(error))
            return
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)
        self._write(self._handshake_request())
        try:
            await asyncio.wait_for(self.opened.wait(), OPEN_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - counted as a failure
            self._fail(repr(error))
            return
        if self.error is None:
            self._send(OP_TEXT, json.dumps({"last_seq": 0}).encode())

    def _handshake_request(self) -> bytes:
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    # -- the socket ----------------------------------------------------------------------

    def _readable(self) -> None:
        if self.sock is None:
            return
        try:
            data, ancillary, _, _ = self.sock.recvmsg(READ_SIZE, ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._lost(error)
            return
        if not data:
            self._lost(None)
            return
        now = time.time()
        arrived = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = struct.unpack("qq", value[:16])
                arrived = seconds + nanoseconds / 1e9
        if arrived is None:  # counted: the kernel said nothing, the read time stands in
            self.untimed += 1
            arrived = now
        self.buffer += data
        if not self.upgraded and not self._handshake():
            return
        self._frames(arrived, now)

    def _write(self, data: bytes) -> None:
        if self.sock is None:
            return
        if not self.outbox:
            try:
                data = data[self.sock.send(data) :]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as error:
                self._lost(error)
                return
            if not data:
                return
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._writable)
        self.outbox += data

    def _writable(self) -> None:
        if self.sock is None:
            return
        try:
            del self.outbox[: self.sock.send(self.outbox)]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._lost(error)
            return
        if not self.outbox:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
            if self.ended:
                self._drop()
                self._finish()

    def _lost(self, error: Exception | None) -> None:
        if not self.close_received:
            self.error = self.error or (repr(error) if error else "closed without a close frame")
        self._drop()
        self._finish()

    def _drop(self) -> None:
        """Closes the socket now (nothing lingers: the server already has what was sent)."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.remove_writer(sock.fileno())
        sock.close()

    # -- reading -------------------------------------------------------------------------

    def _handshake(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        status, *fields = head.split("\r\n")
        accept = base64.b64encode(hashlib.sha1((self.key + GUID).encode()).digest()).decode()
        answered = {
            name.strip().lower(): value.strip()
            for name, _, value in (field.partition(":") for field in fields)
        }
        if " 101 " not in status + " " or answered.get("sec-websocket-accept") != accept:
            self._fail(f"handshake refused: {status}")
            return False
        self.upgraded = True
        self.opened.set()
        return True

    def _frames(self, arrived: float, now: float) -> None:
        buffer = self.buffer
        offset = 0
        while len(buffer) - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            length = second & 0x7F
            start = offset + 2
            if length == 126:
                if len(buffer) - offset < 4:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if len(buffer) - offset < 10:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            if second & 0x80:
                self._fail("the server masked a frame")
                return
            if len(buffer) - start < length:
                break
            payload = bytes(buffer[start : start + length])
            offset = start + length
            self._frame(first & 0x80, first & 0x0F, payload, arrived, now)
            if self.sock is None:
                return
        del buffer[:offset]

    def _frame(self, fin: int, opcode: int, payload: bytes, arrived: float, now: float) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            self.fragments.append(payload)
            if fin:
                message = b"".join(self.fragments)
                self.fragments.clear()
                self._message(message, arrived, now)
        elif opcode == OP_PING:
            self._send(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            self.close_received = True
            if not self.close_sent:
                self.close_sent = True
                self._send(OP_CLOSE, payload[:2])
            if self.outbox:
                self.ended = True  # dropped once the reply is out (`_writable`)
            else:
                self._drop()
                self._finish()

    def _message(self, message: bytes, arrived: float, now: float) -> None:
        for found in DATA_SEQ.findall(message):
            seq = int(found)
            if seq in self.arrived:
                self.duplicates += 1
            elif seq != self.last + 1:
                self.in_order = False
            self.last = max(self.last, seq)
            self.arrived.setdefault(seq, arrived)
            self.read.setdefault(seq, now)
        if b'id="watchers"' in message:
            self.settled.set()
        self._maybe_ack()
        self.progress.set()

    # -- writing -------------------------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.sock is None:
            return
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = bytes((0x80 | opcode, 0x80 | length))
        elif length < 1 << 16:
            header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
        key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
        self._write(header + mask + masked)

    def _maybe_ack(self) -> None:
        if self.last - self.acked >= ACK_EVERY:
            self._ack()
        elif self.last > self.acked and self.ack_timer is None:
            self.ack_timer = asyncio.get_running_loop().call_later(ACK_AFTER, self._ack)

    def _ack(self) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if self.last > self.acked:
            self.acked = self.last
            self._send(OP_TEXT, json.dumps({"ack": self.last}).encode())

    # -- ending --------------------------------------------------------------------------

    def _fail(self, error: str) -> None:
        self.error = self.error or error
        self._drop()
        self._finish()

    def _finish(self) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        self.opened.set()
        self.settled.set()
        self.progress.set()
        self.lost.set()

    async def close(self) -> None:
        if self.sock is None:
            return
        if not self.close_sent:
            self.close_sent = True
            self._send(OP_CLOSE, (1000).to_bytes(2, "big"))
        try:
            await asyncio.wait_for(self.lost.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            self.error = self.error or "the server did not close"
            self._drop()


class Crowd:
    """The viewers, spread over the URLs in turn (several web workers: as a load balancer
    would spread browsers' sockets)."""

    def __init__(self, urls: list[str], cookie: str, viewers: int) -> None:
        self.tabs = [Tab(urls[n % len(urls)], cookie) for n in range(viewers)]

    async def open(self) -> dict[str, Any]:
        t0, cpu0 = time.perf_counter(), _cpu()
        await asyncio.gather(*(tab.open() for tab in self.tabs))
        opened = time.perf_counter() - t0
        await asyncio.gather(*(tab.settled.wait() for tab in self.tabs))
        return {
            "open_wall_s": opened,
            "settled_wall_s": time.perf_counter() - t0,
            "client_cpu_s": _cpu() - cpu0,
            "failures": [tab.error for tab in self.tabs if tab.error][:5],
            "failed": sum(1 for tab in self.tabs if tab.error),
        }

    async def expect(
        self, started: dict[str, float], recording: dict[str, float], timeout: float
    ) -> dict[str, Any]:
        begun = {int(seq): t0 for seq, t0 in started.items()}
        stored = {int(seq): t0 for seq, t0 in recording.items()}
        last = max(begun)
        deadline = time.monotonic() + timeout
        for tab in self.tabs:
            while tab.last < last and tab.error is None:
                tab.progress.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(tab.progress.wait(), remaining)
                except TimeoutError:
                    break
        return {
            "latency": percentiles(self._latencies(begun)),
            "latency_read": percentiles(self._latencies(begun, read=True)),
            "untimed_reads": sum(tab.untimed for tab in self.tabs),
            "latency_from_record": percentiles(self._latencies(stored)),
            "complete": all(set(begun) <= set(tab.arrived) for tab in self.tabs),
            "in_order": all(tab.in_order and not tab.duplicates for tab in self.tabs),
            "failed": sum(1 for tab in self.tabs if tab.error),
            "failures": [tab.error for tab in self.tabs if tab.error][:5],
        }

    def _latencies(self, since: dict[int, float], *, read: bool = False) -> list[float]:
        return [
            times[seq] - t0
            for tab in self.tabs
            for times in [tab.read if read else tab.arrived]
            for seq, t0 in since.items()
            if seq in times
        ]

    async def close(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        await asyncio.gather(*(tab.close() for tab in self.tabs))
        return {"close_wall_s": time.perf_counter() - t0}


async def main(args: argparse.Namespace) -> None:
    crowd = Crowd(args.url, args.cookie, args.viewers)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        kind = command["cmd"]
        if kind == "quit":
            return
        if kind == "open":
            result = await crowd.open()
        elif kind == "expect":
            result = await crowd.expect(
                command["started"], command.get("recording", {}), command.get("timeout", 120)
            )
        elif kind == "close":
            result = await crowd.close()
        else:
            result = {"cpu_s": _cpu()}
        sys.stdout.write(MARK + json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, action="append", help="again for each worker")
    parser.add_argument("--cookie", required=True)
    parser.add_argument("--viewers", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
