"""The benchmarks still run: each script once, as small as it goes, against the embedded
sandbox server. What they measure is not asserted here (docs/benchmarks.md); that they
measure at all, and that every event reached every viewer, is: a change to the bridge or
the consumer that a benchmark's instrumented subclass no longer fits shows here, not in
the next round's first measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.timeout(180),
    # They run on the embedded default whatever this run's database: once is enough.
    pytest.mark.skipif(
        bool(os.environ.get("PORTHOLE_TEAM_CHILD")),
        reason="the benchmarks' smoke runs are in the suite's SQLite run",
    ),
]


def _bench(script: str, *args: str, results: Path) -> dict[str, object]:
    env = {**os.environ, "PORTHOLE_BENCH_RESULTS": str(results), "PYTHONUNBUFFERED": "1"}
    for name in ("DATABASE_URL", "REDIS_URL"):  # the embedded default, whatever this run's
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (written,) = results.glob("*.json")
    return json.loads(written.read_text())


def test_it_runs_the_recording_benchmark(tmp_path: Path) -> None:
    found = _bench(
        "run.py",
        *("--events", "40", "--bytes", "50", "--viewers", "2", "--repeat", "1"),
        *("--paced", "0", "--no-slow"),
        results=tmp_path,
    )
    (run,) = found["porthole"]  # type: ignore[misc]
    assert run["flood_events"] == 40
    assert run["all_delivered"] is True
    assert [viewer["exactly_once_in_order"] for viewer in run["viewers"]] == [True, True]


def test_it_runs_the_fanout_benchmark(tmp_path: Path) -> None:
    found = _bench(
        "fanout.py",
        *("--viewers", "2", "--repeat", "1", "--events", "20", "--pace", "0.01"),
        *("--idle", "", "--export-events", "0"),
        results=tmp_path,
    )
    (run,) = found["runs"]["fanout-2"]  # type: ignore[index]
    assert run["complete"] is True
    assert run["in_order"] is True
    assert run["failed"] == 0
