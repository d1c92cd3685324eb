"""The first thing that runs inside a sandbox's container: limits, user, environment, exec.

    python -I -S jail.py SPEC_FD STATUS_FD

bubblewrap starts this with an empty environment, so nothing the sandbox was given (a hostile
`LD_PRELOAD`, say) touches a process that still holds privileges. It reads its spec (JSON: the
command, its environment, cwd, rlimits and, when the server runs as root, the uid/gid to become)
from SPEC_FD, applies the limits, drops to the sandbox's user, tells the server on STATUS_FD that
the command was found (or why not), and replaces itself with the command.

Standard library only, no imports from the project: it runs with `-I -S` before anything of the
sandbox's is trusted.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

LIMITS = {
    "cpu_seconds": resource.RLIMIT_CPU,
    "data_bytes": resource.RLIMIT_DATA,
    "processes": resource.RLIMIT_NPROC,
    "file_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
    "core_bytes": resource.RLIMIT_CORE,
}


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def find_executable(command: str, path: str) -> str | None:
    if "/" in command:
        return command if os.access(command, os.X_OK) and not os.path.isdir(command) else None
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", command)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def apply(spec: dict[str, Any]) -> None:
    for name, value in spec.get("limits", {}).items():
        kind = LIMITS[name]
        _, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
    uid, gid = spec.get("uid"), spec.get("gid")
    if uid is not None and gid is not None:
        # From root to an unprivileged uid: every capability goes with it, and bubblewrap
        # already set no_new_privs, so no setuid binary can bring one back.
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.chdir(spec["cwd"])


def main() -> int:
    spec_fd, status_fd = int(sys.argv[1]), int(sys.argv[2])
    status = os.fdopen(status_fd, "w")
    try:
        spec = json.loads(read_all(spec_fd))
        apply(spec)
        argv: list[str] = spec["argv"]
        env: dict[str, str] = spec["env"]
        executable = find_executable(argv[0], env.get("PATH", os.defpath))
        if executable is None:
            raise FileNotFoundError(f"{argv[0]!r}: command not found in the sandbox")
    except Exception as exc:  # any failure here is the server's 400, said on the status pipe
        status.write(f"error {exc}\n")
        status.close()
        return 127
    status.write("exec\n")
    status.close()
    try:
        os.execve(executable, argv, env)
    except OSError as exc:
        print(f"cannot run {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
    return 127


if __name__ == "__main__":
    sys.exit(main())
