"""A long-lived process sets start-up's objects aside from full garbage collections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COUNT_FROZEN = "import gc, {module}; print(gc.get_freeze_count())"


def _frozen_after_importing(module: str, tmp_path: Path) -> int:
    env = dict(
        os.environ, DJANGO_SETTINGS_MODULE="dashboard.settings", PORTHOLE_DATA_DIR=str(tmp_path)
    )
    out = subprocess.run(
        [sys.executable, "-c", COUNT_FROZEN.format(module=module)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_it_freezes_what_the_application_loaded_once_it_is_imported(tmp_path: Path) -> None:
    # Web workers and `manage.py serve` import the application and then live long; a
    # process that only imports Django (the interpreter may freeze a few of its own) does not.
    baseline = _frozen_after_importing("django", tmp_path)
    assert _frozen_after_importing("dashboard.asgi", tmp_path) > baseline + 50_000
