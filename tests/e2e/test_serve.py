"""`manage.py serve` as an operator runs it: what its processes show to the rest of the host."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Porthole


def _process_group(pgid: int) -> list[Path]:
    procs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        # Field 5 (after the parenthesised name, which may hold spaces) is the group id.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            procs.append(proc)
    return procs


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
