"""A process started in a sandbox: its pipes, its exit, its stdin and its output hub.

Isolated (the default), the process is bubblewrap running the command in a container of its
own (see isolation.py): a signal goes to everything inside, and a SIGKILL ends the container's
PID namespace, which the kernel empties at once, double forks and `setsid` included.

Unisolated (an explicit opt-in), the process runs in its own session (so its own process
group): signals go to the whole session and its descendants found in /proc.

Exit is watched through a pidfd rather than through the pipes: a background grandchild that
inherited stdout must not keep the session "running" after its own process has exited.
When the process exits, whatever it wrote is already in the pipes; that is drained at once,
then the exit is published.

Why a little over 400 lines: spawning, signalling and watching the exit share one session's
pidfd, pipes and process tree, and read best together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from . import isolation
from .process_tree import signal_container, signal_session, start_time
from .streams import STDERR, STDOUT, Chunk, OutputHub
from .timeutil import utc_now_iso

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# Above this much unwritten stdin, writers that can wait (WebSocket clients) are held back.
STDIN_HIGH_WATER = 1024 * 1024

SessionKind = Literal["exec", "agent"]


def exit_code_from_returncode(returncode: int) -> int:
    """Killed by signal N is reported as 128 + N, as shells do."""
    return 128 - returncode if returncode < 0 else returncode


class SpawnError(Exception):
    """The command could not be started (not found, not executable, bad cwd)."""


# How long bubblewrap and the jail may take to say the command is about to run.
JAIL_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Jail:
    """Run the process in a bubblewrap container with this confinement."""

    bwrap: str
    confinement: isolation.Confinement


@dataclass(frozen=True)
class ProcessSpec:
    argv: list[str]
    cwd: str  # as the process sees it (inside the container when jailed)
    env: dict[str, str]
    jail: Jail | None = None


def _start_unjailed(spec: ProcessSpec, command: str) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            spec.argv,
            cwd=spec.cwd,
            env=spec.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    except (OSError, ValueError) as exc:
        raise SpawnError(f"cannot start {command!r}: {exc}") from exc


async def _start_jailed(spec: ProcessSpec, jail: Jail, command: str) -> subprocess.Popen[bytes]:
    """bubblewrap running the jail, which says on a pipe whether the command will run.

    The command, its environment and limits go to the jail through a memfd rather than
    bubblewrap's command line or environment: command lines are public on the host, and the
    sandbox's environment must not reach a process that is still privileged.
    """
    spec_fd = _memfd("porthole-sandbox-spec")
    args_fd = _memfd("porthole-sandbox-args")
    passwd_fd, group_fd = _memfd("porthole-sandbox-passwd"), _memfd("porthole-sandbox-group")
    status_read, status_write = os.pipe()
    try:
        _fill(spec_fd, isolation.jail_spec(jail.confinement, spec.argv, spec.env, spec.cwd))
        passwd, group = isolation.identity_files(jail.confinement)
        _fill(passwd_fd, passwd)
        _fill(group_fd, group)
        bwrap, *options = isolation.bwrap_args(
            jail.bwrap, jail.confinement, identity_fds=(passwd_fd, group_fd)
        )
        # Through --args, so that the container's PID 1 (bubblewrap) shows the sandbox no host
        # paths in its command line, and `ps` on the host shows no sandbox's settings.
        _fill(args_fd, b"".join(option.encode() + b"\0" for option in options))
        try:
            popen = subprocess.Popen(
                [
                    bwrap,
                    "--args",
                    str(args_fd),
                    "--",
                    *isolation.jail_command(spec_fd, status_write),
                ],
                cwd="/",
                env={"PATH": isolation.SANDBOX_PATH},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                pass_fds=(spec_fd, args_fd, passwd_fd, group_fd, status_write),
            )
        except (OSError, ValueError) as exc:
            raise SpawnError(f"cannot start the sandbox for {command!r}: {exc}") from exc
    finally:
        for fd in (spec_fd, args_fd, passwd_fd, group_fd, status_write):
            os.close(fd)
    try:
        status = await asyncio.wait_for(
            asyncio.to_thread(_read_status, status_read), JAIL_START_TIMEOUT
        )
    except TimeoutError:
        popen.kill()
        status = "error the sandbox did not start in time"
    finally:
        await asyncio.to_thread(os.close, status_read)
    if status == "exec":
        return popen
    popen.kill()
    stderr = await asyncio.to_thread(_finish_failed, popen)
    reason = status.removeprefix("error ").strip() or stderr or "the sandbox did not start"
    raise SpawnError(f"cannot start {command!r}: {reason}")


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC)


def _fill(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)


def _read_status(fd: int) -> str:
    """The jail's one status line; "" when the pipe closed first (bubblewrap failed)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _finish_failed(popen: subprocess.Popen[bytes]) -> str:
    _, stderr = popen.communicate(timeout=10)
    return stderr.decode(errors="replace").strip()[-500:]


class _PipeReader:
    """Reads one non-blocking pipe in chunks of up to 64 KiB as data arrives."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pipe: Any, on_data: Callable[[bytes], None]
    ) -> None:
        self._loop = loop
        self._pipe = pipe
        self._fd: int = pipe.fileno()
        self._on_data = on_data
        self.closed = False
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._read_once)

    def _read(self) -> bytes | None:
        """One chunk; b"" at end of file; None when nothing is available yet."""
        try:
            return os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _read_once(self) -> None:
        data = self._read()
        if data is None:
            return
        if not data:
            self.close()
            return
        self._on_data(data)

    def drain(self) -> None:
        """Take everything already in the pipe, without waiting for more."""
        while not self.closed:
            data = self._read()
            if not data:
                return
            self._on_data(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        self._pipe.close()


class _StdinProtocol(asyncio.BaseProtocol):
    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()


class ExecSession:
    """One process and everything clients need from it."""

    def __init__(
        self,
        *,
        session_id: str,
        sandbox_id: str,
        kind: SessionKind,
        command: str,
        args: list[str],
        popen: subprocess.Popen[bytes],
        jailed: bool = False,
    ) -> None:
        self.session_id = session_id
        self.sandbox_id = sandbox_id
        self.kind = kind
        self.command = command
        self.args = args
        self.started_at = utc_now_iso()
        self.hub = OutputHub()
        self.attached_clients = 0
        self.exited = asyncio.Event()
        self._popen = popen
        self._jailed = jailed
        self._start_time = start_time(popen.pid)  # to recognise the pid if it is ever reused
        self._loop = asyncio.get_running_loop()
        self._stdin: asyncio.WriteTransport | None = None
        self._stdin_protocol = _StdinProtocol()
        self._pidfd: int | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._readers = [
            _PipeReader(self._loop, popen.stdout, self._publisher(STDOUT)),
            _PipeReader(self._loop, popen.stderr, self._publisher(STDERR)),
        ]

    @classmethod
    async def spawn(
        cls,
        spec: ProcessSpec,
        *,
        session_id: str,
        sandbox_id: str,
        kind: SessionKind,
        command: str,
        args: list[str],
        timeout: float = 0,
    ) -> ExecSession:
        if spec.jail is None:
            popen = _start_unjailed(spec, command)
        else:
            popen = await _start_jailed(spec, spec.jail, command)
        session = cls(
            session_id=session_id,
            sandbox_id=sandbox_id,
            kind=kind,
            command=command,
            args=args,
            popen=popen,
            jailed=spec.jail is not None,
        )
        await session._connect_stdin()
        session._watch_exit()
        if timeout > 0:
            session._deadline = session._loop.call_later(timeout, session.signal, signal.SIGKILL)
        return session

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self.hub.exit_code is None

    @property
    def exit_code(self) -> int | None:
        return self.hub.exit_code

    def info(self) -> dict[str, Any]:
        return {
            "sessionID": self.session_id,
            "sandboxID": self.sandbox_id,
            "command": self.command,
            "args": self.args,
            "running": self.running,
            "exitCode": self.exit_code,
            "startedAt": self.started_at,
            "attachedClients": self.attached_clients,
            "truncated": self.hub.ring.truncated,
        }

    # -- stdin ---------------------------------------------------------------------------

    async def _connect_stdin(self) -> None:
        assert self._popen.stdin is not None
        transport, _ = await self._loop.connect_write_pipe(
            lambda: self._stdin_protocol, self._popen.stdin
        )
        self._stdin = transport
        transport.set_write_buffer_limits(high=STDIN_HIGH_WATER)

    def write_stdin(self, data: bytes) -> bool:
        """Queue bytes for the process's stdin; False when stdin is gone (process ended)."""
        if self._stdin is None or self._stdin.is_closing() or not self.running:
            return False
        self._stdin.write(data)
        return True

    async def stdin_writable(self) -> None:
        """Wait until the process has taken most of what was written to its stdin."""
        await self._stdin_protocol.writable.wait()

    # -- signals and exit ----------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """Send a signal to the process and everything it started (see process_tree)."""
        if self._jailed:
            signal_container(self._popen.pid, signum, self._start_time)
        else:
            signal_session(self._popen.pid, signum, self._start_time)

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def _publisher(self, stream: int) -> Callable[[bytes], None]:
        return lambda data: self.hub.publish(Chunk(stream, data))

    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self._popen.pid)
        except (AttributeError, OSError):
            # No pidfd (old kernel): a thread waits instead.
            future = self._loop.run_in_executor(None, self._popen.wait)
            future.add_done_callback(lambda _: self._on_exit())
            return
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        try:
            self._release_watchers()
            self._popen.wait()
            for reader in self._readers:
                reader.drain()
        finally:
            # Whatever went wrong above, clients must learn that the process ended.
            for reader in self._readers:
                reader.close()
            if self._stdin is not None and not self._stdin.is_closing():
                self._stdin.abort()
            code = exit_code_from_returncode(self._popen.returncode or 0)
            logger.info("session %s (%s) exited with %d", self.session_id, self.kind, code)
            self.hub.finish(code)
            self.exited.set()

    def _release_watchers(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._deadline is not None:
            self._deadline.cancel()
