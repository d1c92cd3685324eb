"""Fixtures for the team-mode tests: named people, and workers on PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents.conftest import alice, bob, charlie, dave, erin, oc  # noqa: F401
from tests.conftest import LocalSandbox
from tests.team.procs import Team, free_port, require_team, team


@pytest.fixture
def crew(transactional_db: None, tmp_path: Path) -> Iterator[Team]:
    """Workers with no upstream (its port refuses): `crew.web()`, …; all stop after the test."""
    require_team()
    with team(tmp_path, f"http://127.0.0.1:{free_port()}/api", "no-upstream") as started:
        yield started


@pytest.fixture
def crew_oc(
    transactional_db: None,
    localsandbox: LocalSandbox,
    tmp_path: Path,
) -> Iterator[Team]:
    """Workers against the embedded sandbox server of this run."""
    require_team()
    with team(tmp_path, localsandbox.api_url, localsandbox.api_key) as started:
        yield started
