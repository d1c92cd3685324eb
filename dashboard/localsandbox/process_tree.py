"""Finding everything a session's process started, to signal all of it.

Each exec session starts as the leader of a new session (setsid), so its process group and
session id both equal its pid. Children may move to process groups of their own (shells
with job control, the demo agent's tool commands, the Claude CLI's tools), which a plain
`killpg` would miss: this collects the leader's session, its process group, and every live
descendant of those (which also catches children that called setsid themselves while
their parent is alive). It reads /proc, so Linux only; elsewhere only the group is signalled.

Pids are reused, so the leader's start time is remembered: if a process with the leader's
pid exists but started at another time, the session id now belongs to someone else and
nothing is signalled. (While no process holds that pid, no new session or group can take
that id, so the members found are ours.)

Processes that daemonise (double fork + setsid, reparented to init) escape, as they would
from any supervisor that is not a container or a cgroup.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    pid: int
    ppid: int
    pgrp: int
    session: int
    start_time: int  # clock ticks after boot


def read_entry(pid: int) -> ProcessEntry | None:
    """One process's /proc/<pid>/stat, or None when it is gone (or there is no /proc)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat.rsplit(")", 1)[1].split()
    return ProcessEntry(
        pid=pid,
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        start_time=int(fields[19]),
    )


def process_table() -> list[ProcessEntry]:
    entries = (read_entry(int(entry.name)) for entry in PROC.iterdir() if entry.name.isdigit())
    return [entry for entry in entries if entry is not None]


def start_time(pid: int) -> int | None:
    entry = read_entry(pid)
    return entry.start_time if entry else None


def session_processes(leader: int) -> set[int]:
    """The leader's session and group members and all their live descendants."""
    children: defaultdict[int, list[int]] = defaultdict(list)
    found: set[int] = set()
    for entry in process_table():
        children[entry.ppid].append(entry.pid)
        if leader in (entry.session, entry.pgrp):
            found.add(entry.pid)
    pending = [*found, leader]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)
    found.discard(os.getpid())  # never ourselves, whatever the table says
    return found


def leader_pid_reused(leader: int, leader_start_time: int | None) -> bool:
    current = start_time(leader)
    return None not in (current, leader_start_time) and current != leader_start_time


def signal_session(leader: int, signum: int, leader_start_time: int | None) -> None:
    """Send `signum` to everything the session led by `leader` started."""
    if leader_pid_reused(leader, leader_start_time):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signum)
    if not PROC.is_dir():
        return
    for pid in session_processes(leader):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
