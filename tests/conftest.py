"""Shared fixtures: the embedded sandbox server, started for real as a subprocess."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from channels.layers import channel_layers

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (http://\S+)")
WORKSPACES = re.compile(r"localsandbox workspaces in (\S+)")


@dataclass
class LocalSandbox:
    """A running `manage.py localsandbox` process."""

    api_url: str  # ends in /api
    api_key: str
    workspaces_dir: Path
    process: subprocess.Popen[str]
    log: list[str]

    @property
    def ws_url(self) -> str:
        return self.api_url.replace("http://", "ws://", 1)


def start_localsandbox(
    workspaces_dir: Path | None,
    *,
    api_key: str | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    python: str = sys.executable,
) -> LocalSandbox:
    """`workspaces_dir` None: the server's own default, as `manage.py serve` leaves it."""
    key = api_key if api_key is not None else secrets.token_hex(16)
    args = [
        python,
        str(ROOT / "manage.py"),
        "localsandbox",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--agent",
        "demo",
    ]
    if workspaces_dir is not None:
        args += ["--workspaces-dir", str(workspaces_dir)]
    args += extra_args or []
    # The demo agent unless a test asks otherwise: a developer's own key must not leak in.
    proc_env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc_env.pop("ANTHROPIC_API_KEY", None)
    proc_env.pop("LOCALSANDBOX_API_KEY", None)
    # Isolated, as an operator's would be, whatever the developer's shell says.
    for name in (
        "LOCALSANDBOX_UNSAFE_NO_ISOLATION",
        "LOCALSANDBOX_BWRAP",
        "LOCALSANDBOX_WORKSPACES_DIR",
    ):
        proc_env.pop(name, None)
    if key:  # not on the command line, which every process can read
        proc_env["LOCALSANDBOX_API_KEY"] = key
    proc_env.update(env or {})
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=proc_env,
        # As from a terminal, whatever started this test run: a run started in the background
        # by a non-interactive shell ignores SIGINT, and its children would inherit that.
        preexec_fn=_default_sigint,
    )
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            match = LISTENING.search(line)
            if match and not found.is_set():
                url.append(match.group(1).rstrip("/"))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout) or not url:
        process.kill()
        raise RuntimeError("localsandbox did not start:\n" + "".join(log))
    said = next(m.group(1) for m in map(WORKSPACES.search, log) if m)
    return LocalSandbox(
        api_url=url[0], api_key=key, workspaces_dir=Path(said), process=process, log=log
    )


def stop_localsandbox(server: LocalSandbox) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def localsandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSandbox]:
    """One embedded sandbox server (demo agent, API key required) for the whole run."""
    server = start_localsandbox(tmp_path_factory.mktemp("localsandbox"))
    if not any("(isolation: bubblewrap)" in line for line in server.log):
        stop_localsandbox(server)
        said = "".join(line for line in server.log if "isolation" in line)
        # Everything that runs a command would fail with 503; say why once, plainly.
        pytest.fail(f"the embedded sandbox server cannot isolate sandboxes here:\n{said}")
    yield server
    stop_localsandbox(server)


@pytest.fixture(autouse=True)
def fresh_channel_layer() -> Iterator[None]:
    """A channel layer of its own for every test. Each async test runs on an event loop of its
    own, and channels-redis makes its receive locks on the first loop that uses the layer: a
    lock still held when a test's loop ended (a receive cancelled with it) would fail every
    later receive in the process ("bound to a different event loop"). One process with one
    loop, as a worker is, never meets this."""
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):  # type: ignore[no-untyped-def]
    """Real hashing costs a second per user; the tests make many users and check no hashes."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests last: the slowest, and the ones whose failures say least about why. The
    team-mode run after them: it only waits for its child, which runs beside all the rest."""
    items.sort(key=lambda item: (item.path.name == "test_team_mode.py", "e2e" in item.path.parts))


def pytest_collection_finish(session: pytest.Session) -> None:
    from tests.team import test_team_mode

    test_team_mode.start_early(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.team import test_team_mode

    test_team_mode.stop_early(session)
