"""Real worker processes for the team-mode tests: uvicorn web workers, bridge workers, nginx.

The processes share the test database (PostgreSQL, through pytest-django's `test_…`
database and committed data: the tests use `transactional_db`) and the Redis channel layer
of the test process, so a test prepares rows with the ORM and watches what the workers do.
Every process is a child of the test, stopped (or killed) by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from dashboard.webserver import command_line

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# A socket's opening and closing, as uvicorn logs them: noise beside a failure.
ACCESS_LOG = re.compile(r'"WebSocket /|uvicorn.error: connection (open|closed)$')


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def team_configured() -> bool:
    """Whether this pytest runs on PostgreSQL and the Redis channel layer."""
    engine = settings.DATABASES["default"]["ENGINE"]
    backend = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    return "postgresql" in engine and "redis" in backend.lower()


def require_team() -> None:
    """Skip unless on PostgreSQL + Redis; test_team_mode.py runs these in such a child."""
    if not team_configured():
        pytest.skip(
            "needs DATABASE_URL=postgres://… and REDIS_URL: tests/team/test_team_mode.py "
            "runs these in a child pytest on PostgreSQL and Redis"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url() -> str:
    """The URL of the database this test process uses right now (the test database)."""
    db = connection.settings_dict
    user = quote(db.get("USER") or "", safe="")
    password = quote(db.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{db['NAME']}"


def redis_url() -> str:
    return str(os.environ["REDIS_URL"])


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def http_status(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


@dataclass
class Proc:
    """One child process with its combined output kept in memory."""

    name: str
    process: subprocess.Popen[str]
    port: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return "".join(self.log)

    def problems(self, limit: int = 4000) -> str:
        """The output without access-log lines: what to show when a test fails."""
        lines = [line for line in self.log if not ACCESS_LOG.search(line)]
        return "".join(lines)[-limit:]

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # a paused process cannot exit
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _spawn(name: str, args: list[str], env: dict[str, str], port: int = 0) -> Proc:
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc = Proc(name=name, process=process, port=port)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            proc.log.append(line)

    threading.Thread(target=pump, daemon=True, name=f"log-{name}").start()
    return proc


@dataclass
class Team:
    """The environment every worker of one test shares, and the processes it started."""

    env: dict[str, str]
    data_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def web(self, name: str = "web", extra_env: dict[str, str] | None = None) -> Proc:
        """A plain `uvicorn` web worker as docs/deploy.md runs it, ready when /healthz answers."""
        port = free_port()
        program, *args = command_line("127.0.0.1", port)
        args = [str(VENV_BIN / program), *args]
        proc = _spawn(name, args, {**self.env, **(extra_env or {})}, port)
        self.procs.append(proc)
        self._wait_healthy(proc)
        return proc

    def serve(self, name: str = "serve", extra_env: dict[str, str] | None = None) -> Proc:
        """`manage.py serve`: web and bridges in one process."""
        port = free_port()
        env = {**self.env, "PORTHOLE_HOST": "127.0.0.1", "PORTHOLE_PORT": str(port)}
        args = [sys.executable, str(ROOT / "manage.py"), "serve"]
        proc = _spawn(name, args, {**env, **(extra_env or {})}, port)
        self.procs.append(proc)
        self._wait_healthy(proc)
        return proc

    def bridges(self, name: str = "bridges", extra_env: dict[str, str] | None = None) -> Proc:
        """`manage.py bridges`: bridge supervision with no HTTP, its worker id = `name`."""
        args = [sys.executable, str(ROOT / "manage.py"), "bridges", "--worker-id", name]
        proc = _spawn(name, args, {**self.env, **(extra_env or {})})
        self.procs.append(proc)
        return proc

    def nginx(self, upstreams: list[Proc], name: str = "nginx") -> Proc:
        """nginx in front of `upstreams` (generated config, a free loopback port, no daemon)."""
        from tests.team.nginx import nginx_binary, write_config

        binary = nginx_binary()
        port = free_port()
        conf_dir = self.data_dir / name
        config = write_config(conf_dir, port, [p.port for p in upstreams], ROOT / "static")
        args = [binary, "-p", str(conf_dir), "-c", str(config), "-e", "stderr"]
        proc = _spawn(name, args, dict(os.environ), port)
        self.procs.append(proc)
        wait_until(
            lambda: http_status(f"{proc.url}/healthz") == 200 or proc.process.poll() is not None,
            20,
            f"{name} to answer",
        )
        if proc.process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{proc.output()}")
        return proc

    def _wait_healthy(self, proc: Proc, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if proc.process.poll() is not None:
                raise RuntimeError(f"{proc.name} exited early:\n{proc.output()}")
            return http_status(f"{proc.url}/healthz") == 200

        try:
            wait_until(ready, timeout, f"{proc.name} to answer /healthz")
        except AssertionError:
            raise AssertionError(f"{proc.name} did not start:\n{proc.output()}") from None

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@contextlib.contextmanager
def team(data_dir: Path, api_url: str, api_key: str, **extra: str) -> Iterator[Team]:
    """Workers on this test's database and Redis, against the embedded sandbox server."""
    env = dict(os.environ)
    for name in ("ANTHROPIC_API_KEY", "PYTEST_CURRENT_TEST", "LOCALSANDBOX_API_KEY"):
        env.pop(name, None)
    env.update(
        DATABASE_URL=database_url(),
        REDIS_URL=redis_url(),
        PORTHOLE_DATA_DIR=str(data_dir),
        SECRET_KEY=str(settings.SECRET_KEY),  # sessions signed here are valid there
        OPENCOMPUTER_API_URL=api_url,
        OPENCOMPUTER_API_KEY=api_key,
        DJANGO_SETTINGS_MODULE="dashboard.settings",
        PYTHONUNBUFFERED="1",
        DEBUG="false",
        ALLOWED_HOSTS="localhost,127.0.0.1",
        # nginx runs on this machine: its X-Forwarded-* are believed, nobody else's.
        PORTHOLE_TRUSTED_PROXIES="127.0.0.1",
        LOG_LEVEL="INFO",
    )
    env.update(extra)
    crew = Team(env=env, data_dir=data_dir)
    try:
        yield crew
    finally:
        crew.stop_all()


def have_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
