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
import signal
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


def _walk(children: dict[int, list[int]], roots: set[int], found: set[int]) -> set[int]:
    """`found` plus every descendant of `roots` in the parent-to-children map."""
    pending = list(roots)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _children_map(table: list[ProcessEntry]) -> dict[int, list[int]]:
    children: defaultdict[int, list[int]] = defaultdict(list)
    for entry in table:
        children[entry.ppid].append(entry.pid)
    return children


def session_processes(leader: int) -> set[int]:
    """The leader's session and group members and all their live descendants."""
    table = process_table()
    members = {e.pid for e in table if leader in (e.session, e.pgrp)}
    found = _walk(_children_map(table), members | {leader}, set(members))
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


def descendants(root: int) -> tuple[set[int], set[int]]:
    """(the direct children of `root`, all its descendants), from one read of /proc."""
    children = _children_map(process_table())
    return set(children.get(root, ())), _walk(children, {root}, set())


def signal_container(monitor: int, signum: int, monitor_start_time: int | None) -> None:
    """Send `signum` to everything in the bubblewrap container that `monitor` watches.

    `monitor` is bubblewrap outside the container; its child is the container's init (PID 1
    inside), whose children are the sandbox's processes. Those get `signum` (so an agent can
    end gracefully on SIGTERM; when its first process ends, init ends and the kernel ends the
    rest). SIGKILL also goes to init and the monitor: the end of init empties the whole PID
    namespace at once, which nothing inside can escape.
    """
    if leader_pid_reused(monitor, monitor_start_time):
        return
    helpers, inside = descendants(monitor)
    targets = list(inside - helpers)
    if signum == signal.SIGKILL:
        # The monitor first: its status is the session's, and it must say killed. Were a
        # child of the first process killed before it (`sleep & wait`), that process could
        # end on its own in between, and the session would seem to have exited with 0.
        targets = [monitor, *helpers, *targets]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
