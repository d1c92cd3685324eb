"""The server side of `bench/fanout.py`: Porthole under uvicorn, and a publisher playing the bridge.

    .venv/bin/python bench/fanout_server.py --data-dir DIR [--role server|publisher]

Role `server` serves the real ASGI application (`dashboard.asgi.application`) with uvicorn on
a loopback port, with `manage.py serve`'s options (`dashboard.webserver`), in this process
(`--asgi-server daphne`: with Daphne, for comparison); the viewers are
real WebSocket clients in another process (`bench/viewers_client.py`). Role `publisher`
runs only the publisher, for a bridges process apart from the web worker (PostgreSQL and
Redis; with the in-memory layer the publisher must share the server's process).

The process takes JSON commands on stdin, one per line, and answers each with one JSON
line on stdout (after `MARK`) (after a first line saying it is ready: port, pid, a viewer's cookie):

- `{"cmd": "session"}`: a new session → `{"session": id}`.
- `{"cmd": "publish", "session", "events", "pace", "bytes"}`: plays the bridge, one
  `recording.record` (store, render once), `publish`, and the search index on its own
  thread (as the bridge), per event every `pace` seconds →
  `{"started": {seq: when read}, "recording": {seq: when its record call began}, "cpu_s",
  "memory", "rate_per_s", "slices", "largest_slice"}` (see `publish_flood`).
- `{"cmd": "publish", ..., "prerecorded": true}`: the same events recorded first, then only
  published at the pace (`replay_flood`): the viewer side alone.
- `{"cmd": "stats"}`: after a garbage collection → `{"rss", "cpu_s"}` of this process.
- `{"cmd": "quit"}`.

The database and channel layer are what the environment says (`DATABASE_URL`, `REDIS_URL`),
else a SQLite file in DIR and the in-memory layer, as `manage.py serve` runs by default.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import PeakRSS, rss  # noqa: E402

MARK = "@@bench "  # answers start with it: anything else on stdout is a library's


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def setup(data_dir: Path) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "dashboard.settings"
    os.environ["PORTHOLE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def viewer_cookie() -> str:
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.test import Client

    from dashboard.agents.access import set_role

    user, _ = User.objects.get_or_create(username="bench-viewer")
    set_role(user, "viewer")
    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}"


def new_session() -> str:
    import uuid

    from dashboard.agents.models import AgentSession, Sandbox

    sandbox = Sandbox.objects.create(upstream_id=f"sb-bench-{uuid.uuid4().hex[:8]}")
    session = AgentSession.objects.create(sandbox=sandbox, upstream_id="bench", title="bench")
    return str(session.id)


def warm_up(size: int) -> None:
    """One event recorded into a session of its own, untimed."""
    from dashboard.agents.recording import record

    record(new_session(), [text_event(-1, size)])


def text_event(n: int, size: int) -> Any:
    from dashboard.agents.recording import NewEvent

    data = {
        "type": "assistant",
        "message": {"role": "assistant", "content": [{"type": "text", "text": "x" * size}]},
        "parent_tool_use_id": None,
        "n": n,
    }
    return NewEvent.from_line("agent", json.dumps(data), data)


async def publish_flood(session_id: str, events: int, pace: float, size: int) -> dict[str, Any]:
    """Plays the bridge: event i is read from upstream at `start + i * pace` (a clock stands
    for the sandbox), and the recorder stores, renders and publishes whatever has been read
    and not recorded yet, up to `RECORD_SLICE` per transaction, as `bridge.Bridge` does, on
    a database thread of its own (`ThreadSensitiveContext`, as the bridge). A busy process
    thus records bigger slices rather than reading the sandbox slower. Latency is measured
    from the moment an event was read (its due time)."""
    from asgiref.sync import ThreadSensitiveContext

    from dashboard.agents.bridge import RECORD_SLICE, IndexFeed, on_bridge_thread
    from dashboard.agents.recording import publish, record

    index = IndexFeed(session_id)  # as the bridge's: the search index on a thread of its own
    started: dict[int, float] = {}  # when each event was read
    recording: dict[int, float] = {}  # when the record call that stored it began
    slices: list[int] = []
    memory = PeakRSS()
    memory.start()
    cpu0, wall0 = _cpu(), time.perf_counter()
    recorded = 0
    async with ThreadSensitiveContext():
        # As a server that has been up a while: templates compiled, the connection open.
        await on_bridge_thread(warm_up)(size)
        begin = time.time()
        while recorded < events:
            now = time.time()
            due = min(events, int((now - begin) / pace) + 1 if pace else events)
            if due <= recorded:
                await asyncio.sleep(begin + recorded * pace - now)
                continue
            batch = list(range(recorded, min(due, recorded + RECORD_SLICE)))
            record_began = time.time()
            # The bridge's own database thread helper: one connection for its life.
            appended, messages = await on_bridge_thread(record)(
                session_id, [text_event(n, size) for n in batch], index=False
            )
            for n, event in zip(batch, appended.events, strict=True):
                started[event.seq] = begin + n * pace
                recording[event.seq] = record_began
            slices.append(len(batch))
            recorded += len(batch)
            await publish(messages)
            await index.hold(appended.events)
        wall = time.perf_counter() - wall0
        await index.finish()
    return {
        "started": started,
        "recording": recording,
        "cpu_s": _cpu() - cpu0,
        "memory": memory.stop(),
        "rate_per_s": events / wall,
        "slices": len(slices),
        "largest_slice": max(slices),
    }


async def replay_flood(session_id: str, events: int, pace: float, size: int) -> dict[str, Any]:
    """The viewer side alone: the events are recorded (stored, rendered) first, untimed and
    unpublished, then their messages are published one every `pace` seconds, as the bridge
    would have. Latency is from each publication; what is measured is the layer, the
    feeds, the consumers and Daphne."""
    from asgiref.sync import ThreadSensitiveContext
    from channels.db import database_sync_to_async

    from dashboard.agents.recording import publish, record

    prepared = []
    async with ThreadSensitiveContext():
        for n in range(events):
            appended, messages = await database_sync_to_async(record)(
                session_id, [text_event(n, size)]
            )
            prepared.append((appended.events[0].seq, list(messages)))
    started: dict[int, float] = {}
    memory = PeakRSS()
    memory.start()
    cpu0, wall0 = _cpu(), time.perf_counter()
    begin = time.time()
    for n, (seq, messages) in enumerate(prepared):
        delay = begin + n * pace - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        started[seq] = time.time()
        await publish(messages)
    wall = time.perf_counter() - wall0
    return {
        "started": started,
        "recording": started,
        "cpu_s": _cpu() - cpu0,
        "memory": memory.stop(),
        "rate_per_s": events / wall,
        "slices": events,
        "largest_slice": 1,
    }


async def handle(command: dict[str, Any]) -> dict[str, Any]:
    from channels.db import database_sync_to_async

    kind = command["cmd"]
    if kind == "session":
        return {"session": await database_sync_to_async(new_session)()}
    if kind == "publish":
        flood = replay_flood if command.get("prerecorded") else publish_flood
        return await flood(command["session"], command["events"], command["pace"], command["bytes"])
    if kind == "stats":
        gc.collect()
        return {"rss": rss(), "cpu_s": _cpu()}
    raise ValueError(f"unknown command {kind!r}")


def answer(result: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def serve_commands(loop: asyncio.AbstractEventLoop, stop: Any) -> None:
    """Reads commands on a thread of its own and runs each on the server's event loop."""
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        try:
            result = asyncio.run_coroutine_threadsafe(handle(command), loop).result()
        except Exception as error:  # noqa: BLE001 - reported to the driver, which stops
            result = {"error": repr(error)}
        answer(result)
    loop.call_soon_threadsafe(stop)


def run_server() -> None:
    """The application as `manage.py serve` serves it (`dashboard.webserver`)."""
    import socket

    import uvicorn

    from dashboard.asgi import application
    from dashboard.webserver import uvicorn_config

    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # whose protocol says TCP, and accepted ones inherit it from this one (uvicorn's own
    # binding names it). With 0 here every small frame waited for the viewer's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(application, "127.0.0.1", 0))
    cookie = viewer_cookie()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            server.should_exit = True

        answer({"port": sock.getsockname()[1], "pid": os.getpid(), "cookie": cookie})
        threading.Thread(target=serve_commands, args=(loop, stop), daemon=True).start()
        await server.serve(sockets=[sock])

    asyncio.run(main())


def run_daphne() -> None:
    """Comparison (`bench/fanout.py --asgi-server daphne`): the same application under
    Daphne, with the options `manage.py serve` gave it until the eighth round."""
    # Import order matters to Twisted: daphne.server installs the asyncio reactor.
    from daphne.server import Server, twisted_loop
    from twisted.internet import reactor

    from dashboard.asgi import application

    server = Server(
        application=application,
        endpoints=["tcp:port=0:interface=127.0.0.1"],
        signal_handlers=False,
        websocket_timeout=86400,
        websocket_handshake_timeout=60,
        websocket_connect_timeout=60,
        application_close_timeout=60,
    )
    cookie = viewer_cookie()

    def ready() -> None:
        if not server.listening_addresses:
            reactor.callLater(0.02, ready)
            return
        port = server.listening_addresses[0][1]
        answer({"port": port, "pid": os.getpid(), "cookie": cookie})
        threading.Thread(
            target=serve_commands, args=(twisted_loop, reactor.stop), daemon=True
        ).start()

    reactor.callWhenRunning(ready)
    server.run()


def run_publisher() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        answer({"pid": os.getpid()})
        thread = threading.Thread(target=serve_commands, args=(loop, done.set), daemon=True)
        thread.start()
        await done.wait()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--role", choices=["server", "publisher"], default="server")
    parser.add_argument("--asgi-server", choices=["daphne", "uvicorn"], default="uvicorn")
    args = parser.parse_args()
    setup(args.data_dir)
    if args.role == "server":
        migrate()
        if args.asgi_server == "daphne":
            run_daphne()
        else:
            run_server()
    else:
        run_publisher()


if __name__ == "__main__":
    main()
