"""The viewers of `bench/fanout.py`: real WebSocket clients over loopback, in a process apart.

    .venv/bin/python bench/viewers_client.py --url ws://127.0.0.1:PORT/ws/sessions/ID/
                                             --cookie COOKIE --viewers N

Each viewer is a browser tab as `static/porthole/app.js` makes it: it opens the socket, says
hello (`{"last_seq": 0}`), reads every frame, and acknowledges the last seq it holds every
250 events or within a second. It notes when each seq arrives and whether seqs arrive once
and in order. Parsing and acknowledging cost this process, not the server's.

Commands on stdin, one JSON line each, answered by one JSON line (after `MARK`) on stdout:

- `{"cmd": "open"}`: open every viewer at once, each saying hello; answers once every
  socket is open and has its watcher list (the end of its catch-up): wall times, failures.
- `{"cmd": "expect", "started": {seq: t0}, "recording": {seq: t1}, "timeout": s}`: wait
  until every viewer holds the last seq → latencies (arrival − t0, and arrival − t1, pooled
  over viewers), complete, in order.
- `{"cmd": "close"}`: close every viewer at once → wall time, failures.
- `{"cmd": "stats"}`: this process's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import percentiles  # noqa: E402

MARK = "@@bench "
DATA_SEQ = re.compile(r'data-seq="(\d+)"')
ACK_EVERY = 250  # as static/porthole/app.js
ACK_AFTER = 1.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tab:
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        self.socket: Any = None
        self.arrived: dict[int, float] = {}
        self.last = 0
        self.in_order = True
        self.duplicates = 0
        self.acked = 0
        self.ack_timer: asyncio.TimerHandle | None = None
        self.settled = asyncio.Event()
        self.reading: asyncio.Task[None] | None = None
        self.error: str | None = None
        self.progress = asyncio.Event()

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        try:
            self.socket = await connect(
                self.url,
                additional_headers=self.headers,
                compression=None,
                max_size=None,
                open_timeout=120,
                close_timeout=60,
            )
            await self.socket.send(json.dumps({"last_seq": 0}))
        except Exception as error:  # noqa: BLE001 - counted as a failure
            self.error = repr(error)
            self.settled.set()
            return
        self.reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.socket:
                now = time.time()
                text = message if isinstance(message, str) else message.decode()
                for seq in map(int, DATA_SEQ.findall(text)):
                    if seq in self.arrived:
                        self.duplicates += 1
                    elif seq != self.last + 1:
                        self.in_order = False
                    self.last = max(self.last, seq)
                    self.arrived.setdefault(seq, now)
                if 'id="watchers"' in text:
                    self.settled.set()
                self._maybe_ack()
                self.progress.set()
        except Exception as error:  # noqa: BLE001 - a viewer cut off is a failure
            self.error = repr(error)
        finally:
            self.settled.set()
            self.progress.set()

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
            asyncio.ensure_future(self._send_ack(self.last))

    async def _send_ack(self, seq: int) -> None:
        with contextlib.suppress(Exception):  # the reader notes the close
            await self.socket.send(json.dumps({"ack": seq}))

    async def close(self) -> None:
        if self.socket is None:
            return
        try:
            await self.socket.close()
        except Exception as error:  # noqa: BLE001
            self.error = self.error or repr(error)
        if self.reading is not None:
            await asyncio.gather(self.reading, return_exceptions=True)


class Crowd:
    def __init__(self, url: str, cookie: str, viewers: int) -> None:
        origin = "http://" + url.split("//", 1)[1].split("/", 1)[0]
        headers = {"Cookie": cookie, "Origin": origin}
        self.tabs = [Tab(url, headers) for _ in range(viewers)]

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
            "latency_from_record": percentiles(self._latencies(stored)),
            "complete": all(set(begun) <= set(tab.arrived) for tab in self.tabs),
            "in_order": all(tab.in_order and not tab.duplicates for tab in self.tabs),
            "failed": sum(1 for tab in self.tabs if tab.error),
            "failures": [tab.error for tab in self.tabs if tab.error][:5],
        }

    def _latencies(self, since: dict[int, float]) -> list[float]:
        return [
            tab.arrived[seq] - t0
            for tab in self.tabs
            for seq, t0 in since.items()
            if seq in tab.arrived
        ]

    def _latencies(self, since: dict[int, float]) -> list[float]:
        return [
            tab.arrived[seq] - t0
            for tab in self.tabs
            for seq, t0 in since.items()
            if seq in tab.arrived
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
    parser.add_argument("--url", required=True)
    parser.add_argument("--cookie", required=True)
    parser.add_argument("--viewers", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
