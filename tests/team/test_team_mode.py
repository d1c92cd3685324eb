"""Team mode: the bridge and consumer tests again, on PostgreSQL and the Redis channel layer.

They run in a child pytest because the database engine and channel layer are chosen when
settings load. Absent services skip these tests, except under CI, where they fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

pytestmark = [pytest.mark.team, pytest.mark.timeout(600)]


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _require(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (required under CI)")
    pytest.skip(message)


def test_it_records_and_serves_sessions_on_postgresql_and_redis(tmp_path):
    _require("PostgreSQL", "127.0.0.1", 5432)
    _require("Redis", "127.0.0.1", 6379)
    env = dict(
        os.environ,
        DATABASE_URL=POSTGRES_URL,
        REDIS_URL=REDIS_URL,
        PORTHOLE_DATA_DIR=str(tmp_path),
        PORTHOLE_TEAM_CHILD="1",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/agents/test_bridge.py",
            "tests/agents/test_consumers.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.split("\n")[-1], tail
