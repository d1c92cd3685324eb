"""Team mode: the whole suite again, browser tests included, on PostgreSQL and Redis.

The database engine and the channel layer are chosen when settings load, so the suite runs
again in a child pytest with `DATABASE_URL` and `REDIS_URL` set. The child also runs the
real-process tests of tests/team/ (workers, nginx, faults), which need those services.
Absent services skip this test with the reason, except under `CI=true`, where it fails.

The child starts as soon as collection ends (tests/team/conftest.py), so it runs beside the
SQLite run rather than after it: much of either run is waiting on sandbox processes,
browsers and sockets, and run one after the other they took longer than the suite's budget.
This test, collected among the last, waits for it. Tests that touch neither the database nor
the channel layer (the OpenComputer client's, most of the embedded sandbox server's, the
alignment's and Markdown's properties, settings, and `manage.py serve`, which its tests
always start in embedded mode) are not run again there: their outcome cannot depend on
either. Nor are the browser tests marked `browser_side`: what the page does in the browser
with what it was sent (layouts and screenshots, scrolling, notifications, jumps, the prompt
box, close codes the page handles alike), the same whichever database and layer sent it,
where the Django test client's tests in the child check what was sent. The browser tests
of the live path itself run there: a session streamed live, steered and killed, the list
kept live, reconnects and catch-up, flow control, a shared link revoked, a mark seen on
every page watching, a live result in its card, a search hit.

The child has a test database, a Redis database and a Redis key prefix of its own (a test's
`cache.clear()` empties a whole Redis database; pub/sub channels belong to the whole server).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# The child's own budget (the suite on a quiet 2-core machine takes far less; see
# docs/deploy.md for measurements). PORTHOLE_TEAM_TIMEOUT raises it on a busy machine.
CHILD_TIMEOUT = int(os.environ.get("PORTHOLE_TEAM_TIMEOUT", str(30 * 60)))
# Tests that fail in the child only after others (order or load on the shared machine) are
# run once more on their own, up to this many: they must pass there, and are named as flaky.
MAX_RETRIED = 40
# Independent of the database and the channel layer: the same outcome as in the SQLite run.
SAME_EITHER_WAY = [
    "--ignore=tests/opencomputer",
    *(
        f"--ignore={path.relative_to(ROOT)}"
        for path in sorted((ROOT / "tests" / "localsandbox").glob("test_*.py"))
        if path.name not in {"test_isolation_from_porthole.py", "test_start_page.py"}
    ),
    *(
        f"--ignore=tests/{path}"
        for path in (
            "agents/test_alignment.py",
            "agents/test_markdown.py",
            "agents/test_viewers.py",
            "e2e/test_serve.py",
            "test_daphne_glue.py",
            "test_heap.py",
            "test_settings.py",
        )
    ),
]
# The child's arguments. It ran as two shards at once for a while (real processes and
# browsers; the rest): three pytest processes on two cores, each slowed the others down, and
# the whole run took 19-22 min against 20 with one child. What shortens it is less work.
CHILD = [
    "tests",
    "--ignore=tests/team/test_team_mode.py",
    *SAME_EITHER_WAY,
    "-m",
    "not browser_side",
]
SHARDS = {"child": CHILD}
TEST_NAME = "test_it_passes_the_whole_suite_on_postgresql_and_redis"
FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (tests/\S+?(?:\[[^\]]*\])?)(?: - |$)")
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]

pytestmark = [pytest.mark.team, pytest.mark.timeout(2 * CHILD_TIMEOUT + 120)]


@dataclass
class Child:
    """A child pytest writing its report to a file."""

    process: subprocess.Popen[str]
    report: Path
    out: IO[str]
    started: float

    @classmethod
    def start(cls, args: list[str], env: dict[str, str], report: Path) -> Child:
        out = report.open("w")
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            # Ctrl-C must reach it (see `stop`), however this run was started.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        return cls(process, report, out, time.monotonic())

    def wait(self) -> tuple[int, list[str]]:
        """Its exit status (-1: out of time, then stopped) and its report's lines."""
        remaining = CHILD_TIMEOUT - (time.monotonic() - self.started)
        try:
            returncode = self.process.wait(timeout=max(remaining, 1))
        except subprocess.TimeoutExpired:
            self.stop()
            returncode = -1
        self.out.close()
        return returncode, self.report.read_text().splitlines()

    def stop(self) -> None:
        """Ctrl-C: pytest tears its fixtures down (workers, servers) and prints what failed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.out.close()


EARLY = pytest.StashKey[list[Child]]()


def _reachable(url: str, default_port: int) -> tuple[bool, str]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return True, f"{host}:{port}"
    except OSError:
        return False, f"{host}:{port}"


def _without_waiting_for_disk(url: str) -> str:
    """The test database's commits do not wait for PostgreSQL to flush its log to disk
    (`synchronous_commit=off`): a fifth off the run, and no test here is about surviving a
    crash of PostgreSQL itself. Worker processes started by tests commit as configured."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("options", "-c synchronous_commit=off")
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def _child_env(data_dir: Path, shard: str) -> dict[str, str]:
    """A shard's own database (pytest-django makes `test_<name>` of it; the end-to-end servers
    `<name>_<server>`), its own Redis database (a test's `cache.clear()` empties a whole one)
    and its own Redis prefix (pub/sub channels belong to the whole Redis server)."""
    suffix = shard.replace("-", "_")
    parts = urlsplit(POSTGRES_URL)
    database = f"{parts.path.lstrip('/') or 'porthole'}_{suffix}"
    url = urlunsplit(parts._replace(path=f"/{database}"))
    redis = urlsplit(REDIS_URL)
    number = int(redis.path.strip("/") or 0) - [*SHARDS, "retry"].index(shard)
    return dict(
        os.environ,
        DATABASE_URL=_without_waiting_for_disk(url),
        REDIS_URL=urlunsplit(redis._replace(path=f"/{number % 16}")),
        REDIS_PREFIX=f"porthole-test-{suffix}",
        PORTHOLE_DATA_DIR=str(data_dir),
        PORTHOLE_TEAM_CHILD="1",
    )


def _start(data_dir: Path) -> list[Child]:
    children = []
    for shard, args in SHARDS.items():
        shard_dir = data_dir / shard
        shard_dir.mkdir()
        env = _child_env(shard_dir, shard)
        children.append(Child.start([*PYTEST, *args], env, shard_dir / "team-mode.log"))
    return children


def start_early(session: pytest.Session) -> None:
    """Start the child now if this run holds the test and the services answer (else the
    test says why when its turn comes)."""
    if os.environ.get("PORTHOLE_TEAM_CHILD") or not any(
        item.name == TEST_NAME for item in session.items
    ):
        return
    if not (_reachable(POSTGRES_URL, 5432)[0] and _reachable(REDIS_URL, 6379)[0]):
        return
    data_dir = Path(tempfile.mkdtemp(prefix="porthole-team-"))
    session.config.stash[EARLY] = _start(data_dir)


def stop_early(session: pytest.Session) -> None:
    """The run ended without waiting for the child (interrupted, -x): do not leave it."""
    for child in session.config.stash.get(EARLY, []):
        child.stop()


def _require(name: str, url: str, default_port: int) -> None:
    ok, where = _reachable(url, default_port)
    if ok:
        return
    message = f"{name} is not reachable on {where} (set TEST_{name.upper()}_URL)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{message}: required under CI=true", pytrace=False)
    pytest.skip(message)


def test_it_passes_the_whole_suite_on_postgresql_and_redis(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if os.environ.get("PORTHOLE_TEAM_CHILD"):
        pytest.skip("this is the team-mode child run already")
    _require("Postgres", POSTGRES_URL, 5432)
    _require("Redis", REDIS_URL, 6379)
    children = request.config.stash.get(EARLY, None) or _start(tmp_path)
    results = [(child, *child.wait()) for child in children]
    for child, returncode, lines in results:
        assert returncode != -1, _said("ran out of time", child.report, lines)
    failed = [test for _, code, lines in results if code != 0 for test in _failed_ids(lines)]
    broken = [(child, lines) for child, code, lines in results if code != 0]
    if broken and 0 < len(failed) <= MAX_RETRIED:
        # Tests that fail only after others on a shared PostgreSQL + Redis (order or load),
        # run once more on their own: they must pass there, and they are named as flaky.
        retry_dir = tmp_path / "retry"
        retry_dir.mkdir()
        again = Child.start(
            [*PYTEST, *failed], _child_env(retry_dir, "retry"), retry_dir / "retry.log"
        )
        returncode, retry_lines = again.wait()
        assert returncode == 0, _said(
            f"failed ({', '.join(failed)}), and again on their own", again.report, retry_lines
        )
        warnings.warn(
            "passed on PostgreSQL + Redis only when run again on their own (flaky there): "
            + ", ".join(failed)
            + "; the first run said:\n"
            + "\n".join(_why(lines) for _, lines in broken),
            stacklevel=1,
        )
    else:
        for child, lines in broken:
            raise AssertionError(_said("failed", child.report, lines))
    for _, _, lines in results:
        summary = lines[-1] if lines else ""
        assert " passed" in summary, "\n".join(lines[-60:])
        # Skips in the child are the ones the SQLite run has too (e.g. no Chromium outside
        # CI); nothing may skip for want of PostgreSQL or Redis there.
        assert "needs DATABASE_URL" not in "\n".join(lines[-60:])


def _failed_ids(lines: list[str]) -> list[str]:
    ids = [m.group(1) for line in lines if (m := FAILED_LINE.match(line))]
    return list(dict.fromkeys(ids))


def _why(lines: list[str], most: int = 20) -> str:
    """A failing run's own words (its `E` and FIGURES lines): the child's log is gone by the
    end of the run, and a flaky failure is otherwise named without a reason."""
    said = [line for line in lines if line.startswith(("E ", "FIGURES "))]
    return "\n".join(said[:most])


def _said(what: str, report: Path, lines: list[str]) -> str:
    tail = "\n".join(lines[-60:])
    return f"the suite on PostgreSQL + Redis {what} ({report}):\n{tail}"
