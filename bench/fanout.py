"""Porthole's viewer side at scale: the fan-out matrix, idle viewers, a streamed export.

    .venv/bin/python bench/fanout.py [--viewers 1,10,100,300] [--repeat 3] [--events 400]
                                     [--pace 0.005] [--idle 100,500] [--export-events 100000]
                                     [--team] [--publisher server|separate] [--web-workers N]

Porthole runs as it is deployed: the real ASGI application under uvicorn, with
`manage.py serve`'s options (`dashboard.webserver`; `--asgi-server daphne` compares), in a
process of its own (`bench/fanout_server.py`), fresh for each measurement. Its viewers are
real WebSocket clients over loopback in another process (`bench/viewers_client.py`), so
parsing frames and acknowledging cost that process, not the server's. By default the
database is a throwaway SQLite file and the layer the in-memory one, as `manage.py serve`
runs; `--team` takes `DATABASE_URL` and `REDIS_URL` from the environment (PostgreSQL, Redis).

- sdk: the official SDK consumes a paced flood (one text every `--pace` seconds) straight
  from the embedded sandbox server: the reference, measured in the same run.
- fanout V: a publisher plays the bridge at the same pace: event i is read from upstream at
  `i * pace`, and a recorder takes what was read and not yet recorded (up to the bridge's
  slice of 100) into one `recording.record` (store, render once) and `publish`, on a
  database thread of its own, as `bridge.Bridge` does. It runs in the server's process (as
  `manage.py serve` runs bridges) or, with `--publisher separate`, in a third (a `manage.py
  bridges` process beside a web worker; needs `--team`); with `--web-workers N` (`--team`)
  there are N web workers and the viewers are spread over them in turn, as a load balancer
  spreads browsers' sockets. V viewers read and acknowledge like
  the page does. Latency is from the moment an event was read to its arrival at a viewer's
  socket (the kernel's time, `SO_TIMESTAMPNS`: one client process reading 300 sockets reads
  the last of a hand-out late, where 300 browsers would not; when it was read is the "as
  read" column), waiting to be recorded included, pooled over viewers, and also from the
  start of the `record` call that stored it (what the first version of this bench
  measured); every viewer must get every seq exactly once and in order (checked). CPU time
  of the server process (including the publisher when it runs there), of the publisher, of
  the viewers' process; the server's peak RSS growth.
  With `--prerecorded` the events are recorded first and only their publication is paced
  and timed: the viewer side alone (layer, feeds, consumers, the ASGI server), without recording.
- idle: after one warm-up viewer, `--idle` viewers (each count in turn) open at once, say
  hello and sit: wall time until every one has its watcher list, the server's CPU for it,
  the server's RSS growth per viewer (after a garbage collection), and closing them all.
- export: a session of `--export-events` events downloaded as JSONL through the ASGI
  application in a child process (0 skips it): time to first byte, total time, peak RSS.

The machine's load average is printed before and after. Nothing is asserted: this measures.
Results go to bench/results/fanout-<timestamp>.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, PeakRSS, write_json  # noqa: E402

MARK = "@@bench "  # as bench/fanout_server.py and bench/viewers_client.py answer
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


class Node:
    """A child speaking the bench's line protocol (`fanout_server.py`, `viewers_client.py`)."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("a") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / script), *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.pid = self.process.pid

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(MARK):
                answer: dict[str, Any] = json.loads(line[len(MARK) :])
                if "error" in answer:
                    raise RuntimeError(f"{self.process.args}: {answer['error']}\n{self.tail()}")
                return answer
        raise RuntimeError(f"{self.process.args} ended ({self.process.wait()})\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of another process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RSSWatch:
    """Peak RSS of another process over a section, sampled every 20 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_rss = self.peak = proc_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, proc_rss(self.pid))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        end = proc_rss(self.pid)
        return {
            "start_mb": self.start_rss / 2**20,
            "peak_delta_mb": (max(self.peak, end) - self.start_rss) / 2**20,
            "end_delta_mb": (end - self.start_rss) / 2**20,
        }


class Stage:
    """A Porthole server (the real ASGI application under uvicorn or Daphne) and, if asked, a
    publisher of its own, in processes of their own; the viewers are another process's real
    sockets."""

    def __init__(self, args: argparse.Namespace, scratch: str) -> None:
        self.env = child_env(args)
        self.log = Path(scratch) / "server.log"
        options = ["--data-dir", scratch, "--asgi-server", args.asgi_server]
        self.servers: list[Node] = []
        self.ports: list[int] = []
        for n in range(args.web_workers):  # one after another: each migrates first
            log = self.log if n == 0 else self.log.with_name(f"server-{n + 1}.log")
            self.servers.append(Node("fanout_server.py", options, self.env, log))
            ready = self.servers[-1].read()
            self.ports.append(ready["port"])
            self.cookie = ready["cookie"]
        self.server = self.servers[0]
        self.nodes = list(self.servers)
        self.publisher = self.server
        if args.publisher == "separate":
            self.publisher = Node(
                "fanout_server.py",
                ["--data-dir", scratch, "--role", "publisher"],
                self.env,
                Path(scratch) / "publisher.log",
            )
            self.nodes.append(self.publisher)
            self.publisher.read()

    def viewers(self, session_id: str, count: int) -> Node:
        urls = []
        for port in self.ports:
            urls += ["--url", f"ws://127.0.0.1:{port}/ws/sessions/{session_id}/"]
        node = Node(
            "viewers_client.py",
            [*urls, "--cookie", self.cookie, "--viewers", str(count)],
            self.env,
            self.log.with_name("viewers.log"),
        )
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def cpu(self) -> float:
        """The web workers' CPU seconds so far (all of them)."""
        return sum(proc_cpu(server.pid) for server in self.servers)

    def complaints(self) -> dict[str, int]:
        """What the servers and Porthole logged: sockets given up on, warnings, errors."""
        text = "".join(server.log.read_text(errors="replace") for server in self.servers)
        return {
            "killed_by_daphne": text.count("took too long to shut down and was killed"),
            "daphne_warnings": text.count(" WARNING daphne"),
            "uvicorn_warnings": text.count(" WARNING uvicorn"),
            "errors": text.count(" ERROR "),
        }


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"))
    if not args.team:
        for name in ("REDIS_URL", "DATABASE_URL"):
            env.pop(name, None)
    return env


def fanout(args: argparse.Namespace, viewers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="porthole-fanout-") as scratch:
        stage = Stage(args, scratch)
        try:
            session_id = stage.server.ask(cmd="session")["session"]
            crowd = stage.viewers(session_id, viewers)
            opened = crowd.ask(cmd="open")
            time.sleep(1.0)  # presence settles
            memory = RSSWatch(stage.server.pid)
            cpu0 = stage.cpu()
            client0 = crowd.ask(cmd="stats")["cpu_s"]
            published = stage.publisher.ask(
                cmd="publish",
                session=session_id,
                events=args.events,
                pace=args.pace,
                bytes=args.bytes,
                prerecorded=args.prerecorded,
            )
            published_cpu = stage.cpu()
            got = crowd.ask(
                cmd="expect",
                started=published["started"],
                recording=published["recording"],
                timeout=120,
            )
            server_cpu = stage.cpu() - cpu0
            if args.prerecorded:  # not the untimed recording: the publishing, then the drain
                server_cpu = published["cpu_s"] + stage.cpu() - published_cpu
            client_cpu = crowd.ask(cmd="stats")["cpu_s"] - client0
            mem = memory.stop()
            crowd.ask(cmd="close")
        finally:
            stage.stop()
            complaints = stage.complaints()
    return {
        "viewers": viewers,
        "events": args.events,
        "server_log": complaints,
        "rate_per_s": published["rate_per_s"],
        "slices": published["slices"],
        "largest_slice": published["largest_slice"],
        "latency": got["latency"],
        "latency_read": got["latency_read"],
        "untimed_reads": got["untimed_reads"],
        "latency_from_record": got["latency_from_record"],
        "complete": got["complete"],
        "in_order": got["in_order"],
        "failed": got["failed"] + opened["failed"],
        "failures": got["failures"] + opened["failures"],
        "server_cpu_s": server_cpu,
        "publisher_cpu_s": published["cpu_s"],
        "publisher_separate": stage.publisher is not stage.server,
        "client_cpu_s": client_cpu,
        "connect_wall_s": opened["settled_wall_s"],
        "memory": mem,
    }


def idle(args: argparse.Namespace, viewers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="porthole-fanout-") as scratch:
        stage = Stage(args, scratch)
        try:
            session_id = stage.server.ask(cmd="session")["session"]
            # One viewer first: what the first socket loads (code, templates) is not per viewer.
            stage.viewers(session_id, 1).ask(cmd="open")
            time.sleep(1.5)
            before = stage.server.ask(cmd="stats")
            cpu0 = proc_cpu(stage.server.pid)
            crowd = stage.viewers(session_id, viewers)
            opened = crowd.ask(cmd="open")
            time.sleep(3.0)  # presence settles (coalesced or not)
            after = stage.server.ask(cmd="stats")
            connect_cpu = proc_cpu(stage.server.pid) - cpu0
            cpu1 = proc_cpu(stage.server.pid)
            closed = crowd.ask(cmd="close")
            time.sleep(1.0)
            close_cpu = proc_cpu(stage.server.pid) - cpu1
        finally:
            stage.stop()
            complaints = stage.complaints()
    return {
        "server_log": complaints,
        "viewers": viewers,
        "connect_cpu_s": connect_cpu,
        "connect_wall_s": opened["settled_wall_s"],
        "open_wall_s": opened["open_wall_s"],
        "failed": opened["failed"],
        "failures": opened["failures"],
        "close_wall_s": closed["close_wall_s"],
        "close_cpu_s": close_cpu,
        "rss_per_viewer_kib": (after["rss"] - before["rss"]) / viewers / 1024,
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
    parser.add_argument("--idle", default="100,500", help="idle viewer counts (empty: none)")
    parser.add_argument("--team", action="store_true", help="DATABASE_URL and REDIS_URL")
    parser.add_argument("--publisher", choices=["server", "separate"], default="server")
    parser.add_argument(
        "--web-workers",
        type=int,
        default=1,
        help="web workers, each a process with its share of the viewers (needs --team)",
    )
    parser.add_argument(
        "--prerecorded",
        action="store_true",
        help="record the events first, then only publish them at the pace: the viewer side "
        "alone, latency from each publication",
    )
    parser.add_argument("--export-events", type=int, default=100_000)
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--asgi-server",
        choices=["daphne", "uvicorn"],
        default="uvicorn",
        help="serve with uvicorn (as Porthole deploys) or, for comparison, Daphne",
    )
    parser.add_argument(
        "--server-root",
        help="start the embedded sandbox server from this checkout (its sandboxes get a "
        "private /tmp, so a checkout under /tmp cannot run their agents)",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
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
    idle_counts = [int(v) for v in args.idle.split(",") if v]
    if args.web_workers > 1 and not args.team:
        parser.error("--web-workers needs --team (the in-memory layer is per process)")
    if args.publisher == "separate" and not args.team:
        parser.error("--publisher separate needs --team (the in-memory layer is per process)")
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
                    record(f"fanout-{viewers}", fanout(args, viewers))
                for viewers in idle_counts:
                    record(f"idle-{viewers}", idle(args, viewers))
                if args.export_events:
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
    one_read = med(f"fanout-{matrix[0]}", "latency_read", "p99_ms")
    print(f"\nmedians of {args.repeat} runs; {args.events} events, one every {args.pace:g} s")
    if args.web_workers > 1:
        print(f"{args.web_workers} web workers, the viewers spread over them in turn")
    print(f"SDK direct: p50 {med('sdk', 'latency', 'p50_ms'):.1f} ms, p99 {sdk_p99:.1f} ms")
    print(
        "| viewers | events/s | p50 ms | p99 ms | p99 / 1 viewer | p99 / SDK "
        "| p99 as read ms (/ 1 viewer) | p99 from record ms | server CPU "
        "ms/event | viewers' CPU ms/event | server peak RSS MiB | events per record "
        "| all once, in order |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    for viewers in matrix:
        name = f"fanout-{viewers}"
        p99 = med(name, "latency", "p99_ms")
        read = med(name, "latency_read", "p99_ms")
        ok = all(r["complete"] and r["in_order"] and not r["failed"] for r in runs[name])
        print(
            f"| {viewers} | {med(name, 'rate_per_s'):.0f} | {med(name, 'latency', 'p50_ms'):.1f} "
            f"| {p99:.1f} | {p99 / one:.1f}× | {p99 / sdk_p99:.1f}× "
            f"| {read:.1f} ({read / one_read:.1f}×) "
            f"| {med(name, 'latency_from_record', 'p99_ms'):.1f} "
            f"| {med(name, 'server_cpu_s') / args.events * 1000:.2f} "
            f"| {med(name, 'client_cpu_s') / args.events * 1000:.2f} "
            f"| {med(name, 'memory', 'peak_delta_mb'):.1f} "
            f"| {args.events / med(name, 'slices'):.1f} | {'yes' if ok else 'NO'} |"
        )
    untimed = sum(r.get("untimed_reads", 0) for v in matrix for r in runs[f"fanout-{v}"])
    if untimed:
        print(f"{untimed} reads came without the kernel's time: their arrival is when read")
    if args.publisher == "separate":
        publisher = [med(f"fanout-{v}", "publisher_cpu_s") / args.events * 1000 for v in matrix]
        print(
            "publisher (a process apart) CPU ms/event: " + ", ".join(f"{c:.2f}" for c in publisher)
        )
    for viewers in idle_counts:
        name = f"idle-{viewers}"
        failed = max((r["failed"] for r in runs[name]), default=0)
        print(
            f"idle: {viewers} viewers open at once, all with their watcher list after "
            f"{med(name, 'connect_wall_s'):.1f} s ({med(name, 'connect_cpu_s'):.2f} s server "
            f"CPU), {med(name, 'rss_per_viewer_kib'):.1f} KiB server RSS each, closed in "
            f"{med(name, 'close_wall_s'):.1f} s ({med(name, 'close_cpu_s'):.2f} s CPU)"
            + (f"; up to {failed} failed" if failed else "")
        )
    for name, cells in runs.items():
        for index, run in enumerate(cells):
            if any(run.get("server_log", {}).values()):
                print(f"server log of {name} #{index + 1}: {run['server_log']}")
    if args.export_events:
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
