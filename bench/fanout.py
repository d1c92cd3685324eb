"""Porthole's viewer side at scale: the fan-out matrix, idle viewers, a streamed export.

    .venv/bin/python bench/fanout.py [--viewers 1,10,100,300] [--repeat 3] [--events 400]
                                     [--pace 0.005] [--idle 300] [--export-events 100000]

Every phase runs in a fresh child process (one phase's heap does not hide the next one's),
on a throwaway SQLite database and the in-memory channel layer, as `manage.py serve` does:

- sdk: the official SDK consumes a paced flood (one text every `--pace` seconds) straight
  from the embedded sandbox server: the reference, measured in the same run.
- fanout V: a publisher plays the bridge at the same pace — `recording.record` (store and
  render once) then `publish` — while V viewers read through the real ASGI application
  (origin check, cookie session, routing, consumer) and acknowledge like the page does.
  Latency is from the start of `record` to the arrival at a viewer; every viewer must get
  every seq exactly once and in order (checked). CPU time and peak RSS of the process.
- idle: `--idle` viewers connect, say hello and sit: CPU to connect them, RSS per viewer.
- export: a session of `--export-events` events downloaded as JSONL through the ASGI
  application: time to first byte, total time, peak RSS growth.

The machine's load average is printed before and after. Nothing is asserted: this measures.
Results go to bench/results/fanout-<timestamp>.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, PeakRSS, percentiles, rss, write_json  # noqa: E402

DATA_SEQ = re.compile(r'data-seq="(\d+)"')
ACK_EVERY = 250  # as static/porthole/app.js
ACK_AFTER = 1.0
ACKS = os.environ.get("BENCH_NO_ACKS") != "1"  # a page from before acknowledgements existed
CHILD_TIMEOUT = 900


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- Django, in a child ----------------------------------------------------------------------


def setup(data_dir: Path) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "dashboard.settings"
    os.environ["PORTHOLE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    for name in ("REDIS_URL", "DATABASE_URL"):
        os.environ.pop(name, None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def _db(fn: Any) -> Any:
    from channels.db import database_sync_to_async

    return database_sync_to_async(fn)


def _viewer_cookie() -> bytes:
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.test import Client

    from dashboard.agents.access import set_role

    user, _ = User.objects.get_or_create(username="bench-viewer")
    set_role(user, "viewer")
    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}".encode()


def _new_session() -> str:
    import uuid

    from dashboard.agents.models import AgentSession, Sandbox

    sandbox = Sandbox.objects.create(upstream_id=f"sb-bench-{uuid.uuid4().hex[:8]}")
    session = AgentSession.objects.create(sandbox=sandbox, upstream_id="bench", title="bench")
    return str(session.id)


def _text_event(n: int, size: int) -> Any:
    from dashboard.agents.recording import NewEvent

    data = {
        "type": "assistant",
        "message": {"role": "assistant", "content": [{"type": "text", "text": "x" * size}]},
        "parent_tool_use_id": None,
        "n": n,
    }
    return NewEvent.from_line("agent", json.dumps(data), data)


class Viewer:
    """A browser tab: hello, read, acknowledge like the page; notes arrivals and order."""

    def __init__(self, path: str, cookie: bytes) -> None:
        from channels.testing import WebsocketCommunicator

        from dashboard.asgi import application

        self.socket = WebsocketCommunicator(
            application,
            path,
            headers=[
                (b"origin", b"http://localhost"),
                (b"cookie", cookie),
                (b"host", b"localhost"),
            ],
        )
        self.arrived: dict[int, float] = {}
        self.last = 0
        self.in_order = True
        self.acked = 0
        self.acked_at = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        connected, code = await self.socket.connect(timeout=60)
        if not connected:
            raise RuntimeError(f"refused ({code})")
        await self.socket.send_json_to({"last_seq": 0})

    def read(self) -> None:
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.socket.receive_output(timeout=3600)
            now = time.time()
            if message["type"] != "websocket.send":
                return
            for seq in map(int, DATA_SEQ.findall(message.get("text") or "")):
                if seq != self.last + 1:
                    self.in_order = False
                self.last = seq
                self.arrived.setdefault(seq, now)
            if ACKS and (
                self.last - self.acked >= ACK_EVERY
                or (self.last > self.acked and time.monotonic() - self.acked_at >= ACK_AFTER)
            ):
                self.acked, self.acked_at = self.last, time.monotonic()
                await self.socket.send_json_to({"ack": self.last})

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        with contextlib.suppress(BaseException):  # measuring, not testing the close
            await self.socket.disconnect(timeout=10)


async def fanout(viewers: int, events: int, pace: float, size: int) -> dict[str, Any]:
    from dashboard.agents.recording import publish, record

    cookie = await _db(_viewer_cookie)()
    session_id = await _db(_new_session)()
    tabs = [Viewer(f"/ws/sessions/{session_id}/", cookie) for _ in range(viewers)]
    connect_cpu = _cpu()
    for tab in tabs:
        await tab.open()
    for tab in tabs:
        tab.read()
    connect_cpu = _cpu() - connect_cpu
    await asyncio.sleep(1.0)  # let the hellos' catch-ups and presence settle
    started: dict[int, float] = {}
    memory = PeakRSS()
    memory.start()
    cpu0, wall0 = _cpu(), time.perf_counter()
    for n in range(events):
        t0 = time.time()
        appended, messages = await _db(record)(session_id, [_text_event(n, size)])
        started[appended.events[0].seq] = t0
        await publish(messages)
        delay = pace - (time.time() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
    published_s = time.perf_counter() - wall0
    last = max(started)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(tab.last < last for tab in tabs):
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - wall0
    cpu = _cpu() - cpu0
    mem = memory.stop()
    latencies = [
        tab.arrived[seq] - t0 for tab in tabs for seq, t0 in started.items() if seq in tab.arrived
    ]
    complete = all(set(started) <= set(tab.arrived) for tab in tabs)
    for tab in tabs:
        await tab.close()
    return {
        "viewers": viewers,
        "events": events,
        "rate_per_s": events / published_s,
        "latency": percentiles(latencies),
        "complete": complete,
        "in_order": all(tab.in_order for tab in tabs),
        "cpu_s": cpu,
        "wall_s": wall,
        "connect_cpu_s": connect_cpu,
        "memory": mem,
    }


async def idle(viewers: int) -> dict[str, Any]:
    import gc

    cookie = await _db(_viewer_cookie)()
    session_id = await _db(_new_session)()
    tabs = [Viewer(f"/ws/sessions/{session_id}/", cookie) for _ in range(viewers)]
    gc.collect()
    before, cpu0, wall0 = rss(), _cpu(), time.perf_counter()
    for tab in tabs:
        await tab.open()
    for tab in tabs:
        tab.read()
    connect_wall = time.perf_counter() - wall0
    await asyncio.sleep(3.0)  # presence settles (coalesced or not)
    cpu = _cpu() - cpu0
    gc.collect()
    after = rss()
    for tab in tabs:
        await tab.close()
    return {
        "viewers": viewers,
        "connect_cpu_s": cpu,
        "connect_wall_s": connect_wall,
        "rss_per_viewer_kib": (after - before) / viewers / 1024,
    }


def _fill(session_id: str, count: int, size: int) -> None:
    from dashboard.agents.models import AgentSession, Event

    for start in range(1, count + 1, 5000):
        rows = []
        for seq in range(start, min(start + 5000, count + 1)):
            raw = json.dumps(
                {
                    "type": "assistant",
                    "message": {"content": [{"type": "text", "text": "y" * size}]},
                }
            )
            rows.append(
                Event(session_id=session_id, seq=seq, source="agent", type="assistant", raw=raw)
            )
        Event.objects.bulk_create(rows)
    AgentSession.objects.filter(id=session_id).update(next_seq=count + 1)


async def export(count: int, size: int) -> dict[str, Any]:
    import gc

    from django.urls import reverse

    from dashboard.asgi import application

    cookie = await _db(_viewer_cookie)()
    session_id = await _db(_new_session)()
    await _db(_fill)(session_id, count, size)
    path = reverse("export_jsonl", args=[session_id])
    gc.collect()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"cookie", cookie)],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    received = asyncio.Event()
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not received.is_set():
            received.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    status = 0
    total = 0
    first: float | None = None
    memory = PeakRSS()
    memory.start()
    t0 = time.perf_counter()

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, total, first
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body and first is None:
                first = time.perf_counter() - t0
            total += len(body)
            if not message.get("more_body"):
                done.set()

    await application(scope, receive, send)
    wall = time.perf_counter() - t0
    return {
        "events": count,
        "status": status,
        "bytes": total,
        "ttfb_s": first,
        "wall_s": wall,
        "memory": memory.stop(),
    }


async def sdk(api_url: str, api_key: str, events: int, pace: float, size: int) -> dict[str, Any]:
    from bench import baseline

    return await baseline.run(api_url, api_key, events, size, pace)


# -- the run ------------------------------------------------------------------------------------


def child(args: argparse.Namespace, phase: str, **extra: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="porthole-fanout-") as scratch:
        out = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase]
        command += ["--out", str(out), "--data-dir", scratch]
        for key, value in extra.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        for key in ("events", "pace", "bytes"):
            if key not in extra:
                command += [f"--{key}", str(getattr(args, key))]
        subprocess.run(command, cwd=ROOT, check=True, timeout=CHILD_TIMEOUT)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def run_phase(args: argparse.Namespace) -> None:
    if args.phase == "sdk":
        result = asyncio.run(sdk(args.api_url, args.api_key, args.events, args.pace, args.bytes))
    else:
        setup(args.data_dir)
        if args.phase == "fanout":
            result = asyncio.run(fanout(args.viewers_n, args.events, args.pace, args.bytes))
        elif args.phase == "idle":
            result = asyncio.run(idle(args.viewers_n))
        else:
            result = asyncio.run(export(args.events, args.bytes))
    write_json(args.out, result)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", default="1,10,100,300")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--pace", type=float, default=0.005)
    parser.add_argument("--bytes", type=int, default=200)
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--export-events", type=int, default=100_000)
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--server-root",
        help="start the embedded sandbox server from this checkout (its sandboxes get a "
        "private /tmp, so a checkout under /tmp cannot run their agents)",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--viewers-n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        run_phase(args)
        return 0

    if args.server_root:
        sys.path.insert(0, str(Path(args.server_root).resolve()))
    from tests.conftest import start_localsandbox, stop_localsandbox

    matrix = [int(v) for v in args.viewers.split(",") if v]
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    results: dict[str, Any] = {"config": vars(args) | {"data_dir": None, "out": None}}
    results["commit"] = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    runs: dict[str, list[dict[str, Any]]] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"fanout-{stamp}{'-' + args.label if args.label else ''}.json"

    def record(name: str, result: dict[str, Any]) -> None:
        runs.setdefault(name, []).append(result)
        write_json(out, results | {"runs": runs, "partial": True})  # kept if the run is cut

    with tempfile.TemporaryDirectory(prefix="porthole-fanout-server-") as server_dir:
        server = start_localsandbox(Path(server_dir))
        try:
            for index in range(args.repeat):
                print(f"repetition {index + 1}/{args.repeat}", flush=True)
                record("sdk", child(args, "sdk", api_url=server.api_url, api_key=server.api_key))
                for viewers in matrix:
                    record(f"fanout-{viewers}", child(args, "fanout", viewers_n=viewers))
                record("idle", child(args, "idle", viewers_n=args.idle))
                record("export", child(args, "export", events=args.export_events))
        finally:
            stop_localsandbox(server)
    load_after = os.getloadavg()
    results |= {"runs": runs, "load_before": load_before, "load_after": load_after}
    write_json(out, results)

    def med(name: str, *path: str) -> float:
        values = []
        for run in runs.get(name, []):
            value: Any = run
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, int | float):
                values.append(float(value))
        return _median(values)

    sdk_p99 = med("sdk", "latency", "p99_ms")
    one = med(f"fanout-{matrix[0]}", "latency", "p99_ms")
    print(f"\nmedians of {args.repeat} runs; {args.events} events, one every {args.pace:g} s")
    print(f"SDK direct: p50 {med('sdk', 'latency', 'p50_ms'):.1f} ms, p99 {sdk_p99:.1f} ms")
    print(
        "| viewers | p50 ms | p99 ms | p99 / 1 viewer | p99 / SDK | CPU s | peak RSS MiB "
        "| all once, in order |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|:---|")
    for viewers in matrix:
        name = f"fanout-{viewers}"
        p99 = med(name, "latency", "p99_ms")
        ok = all(r["complete"] and r["in_order"] for r in runs[name])
        print(
            f"| {viewers} | {med(name, 'latency', 'p50_ms'):.1f} | {p99:.1f} | {p99 / one:.1f}× "
            f"| {p99 / sdk_p99:.1f}× | {med(name, 'cpu_s'):.2f} "
            f"| {med(name, 'memory', 'peak_delta_mb'):.1f} | {'yes' if ok else 'NO'} |"
        )
    print(
        f"\nidle: {args.idle} viewers connect in {med('idle', 'connect_wall_s'):.1f} s "
        f"({med('idle', 'connect_cpu_s'):.1f} s CPU), {med('idle', 'rss_per_viewer_kib'):.0f} "
        "KiB RSS each"
    )
    print(
        f"export: {args.export_events:,} events as JSONL, first byte after "
        f"{med('export', 'ttfb_s') * 1000:.0f} ms, done in {med('export', 'wall_s'):.1f} s, "
        f"peak RSS +{med('export', 'memory', 'peak_delta_mb'):.0f} MiB"
    )
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
