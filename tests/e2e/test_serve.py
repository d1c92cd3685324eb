"""`manage.py serve` and `manage.py bridges` as an operator runs them: what their processes
show to the rest of the host, and how they refuse to start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.e2e.conftest import (
    ROOT,
    Porthole,
    _free_port,
    _healthy,
    _manage,
    _server_env,
    run_porthole,
)
from tests.team.procs import wait_until


def _processes(field: int, value: int) -> list[Path]:
    """Processes whose /proc stat field `field` (counted after the parenthesised name, which
    may hold spaces: 1 is the parent's pid, 2 the group id) is `value`."""
    procs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[field]) == value:
            procs.append(proc)
    return procs


def _process_group(pgid: int) -> list[Path]:
    return _processes(2, pgid)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_it_keeps_the_embedded_servers_key_off_every_command_line(porthole: Porthole) -> None:
    group = _process_group(porthole.process.pid)
    keys = [
        line.split(b"=", 1)[1]
        for proc in group
        for line in _read(proc / "environ").split(b"\0")
        if line.startswith(b"LOCALSANDBOX_API_KEY=")
    ]
    assert keys, "the embedded sandbox server got its key through the environment"
    for proc in _process_group(porthole.process.pid):
        cmdline = _read(proc / "cmdline")
        assert keys[0] not in cmdline, cmdline.replace(b"\0", b" ")


def test_it_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """What `systemctl stop` and the compose file send: the web server closes its sockets,
    the bridges stop, the embedded sandbox server goes with them, and serve exits 0 (it
    used to be Daphne's job; under uvicorn serve has to keep the signal from ending the
    process before any of that)."""
    with run_porthole(tmp_path, "sigterm") as server:
        sandbox_server = _processes(1, server.process.pid)  # serve's children
        assert sandbox_server, "serve starts the embedded sandbox server as its child"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.output()
        assert not any(proc.exists() for proc in sandbox_server)
        assert "Finished server process" in server.output()


def test_it_stops_everything_when_dev_py_start_gets_sigterm(tmp_path: Path) -> None:
    """`python3 dev.py start` became serve's parent: a SIGTERM to it (a supervisor, `kill`)
    ended it alone, and Porthole went on serving."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "dev.py", "start", "--port", str(port), "--sandbox-port", "0"],
        cwd=ROOT,
        env={**_server_env(tmp_path), "PORTHOLE_DEV": "1", "LOCALSANDBOX_AGENT": "demo"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(url) or process.poll() is not None, 120, "Porthole to start")
        assert process.poll() is None, process.communicate()[0]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert not _process_group(process.pid), output
        assert not _healthy(url)
    finally:
        if process.poll() is None:
            process.kill()
        for proc in _process_group(process.pid):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(proc.name), signal.SIGKILL)


def _run_to_end(env: dict[str, str], *command: str) -> tuple[int, str, list[Path]]:
    """A management command run to its end: exit code, output, and what of its process
    group outlived it (serve's embedded sandbox server, if it was left behind)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "django", *command],
        cwd=ROOT,
        env={**env, "LOCALSANDBOX_AGENT": "demo"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output, _ = process.communicate(timeout=90)
    return process.returncode, output, _process_group(process.pid)


def _serve_once(env: dict[str, str], port: int) -> tuple[int, str, list[Path]]:
    return _run_to_end(env, "serve", "--port", str(port), "--sandbox-port", "0")


def test_it_refuses_to_serve_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    """Every page would fail on missing tables: serve says what to run instead of starting
    (it used to start the embedded sandbox server, then die of a traceback, leaving that
    server running on its port)."""
    code, output, left = _serve_once(_server_env(tmp_path), _free_port())
    assert code == 1, output
    assert "unapplied migration" in output and "manage.py migrate" in output, output
    assert "Traceback" not in output, output
    assert left == []


def test_it_starts_no_bridges_worker_on_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    code, output, _ = _run_to_end(_server_env(tmp_path), "bridges", "--worker-id", "b1")
    assert code == 1, output
    assert "unapplied migration" in output and "Traceback" not in output, output


def test_it_never_leaves_the_embedded_sandbox_server_behind(tmp_path: Path) -> None:
    """Serve failing after the embedded sandbox server started (here: its port is taken)
    takes that server down with it."""
    env = _server_env(tmp_path)
    _manage(env, "migrate", "--noinput")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, output, left = _serve_once(env, taken.getsockname()[1])
    assert code != 0, output
    assert "Embedded sandbox server on" in output, output
    assert left == [], output


def test_it_serves_a_bridges_workers_metrics_on_its_port(tmp_path: Path) -> None:
    """A bridges worker has no HTTP of its own: PORTHOLE_METRICS_PORT (which the systemd
    unit sets) serves its counters and the database's gauges on loopback."""
    env = _server_env(tmp_path)
    _manage(env, "migrate", "--noinput")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "django", "bridges", "--worker-id", "b1"],
        cwd=ROOT,
        env={**env, "PORTHOLE_METRICS_PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:

        def scraped() -> str:
            if process.poll() is not None:
                raise AssertionError(f"the bridges worker exited: {process.communicate()[0]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as got:
                    return str(got.read().decode())
            except OSError:
                return ""  # not listening yet

        body = wait_until(scraped, 60, "the bridges worker's metrics")
        for name in ("porthole_events_recorded_total", "porthole_recording_lag_seconds_count"):
            assert name in body, body[:2000]
        assert "porthole_bridge_workers" in body  # the database's gauges too
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert f"Metrics on http://127.0.0.1:{port}/" in output, output
