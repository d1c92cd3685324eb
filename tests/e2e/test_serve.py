"""`manage.py serve` as an operator runs it: what its processes show to the rest of the host."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.e2e.conftest import Porthole, run_porthole


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
