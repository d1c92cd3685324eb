"""Where sandbox workspaces live by default, for the server and Django's settings alike.

Standard library only: `dashboard/settings.py` imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def default_workspaces_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$LOCALSANDBOX_WORKSPACES_DIR`, else per user and outside any data directory:
    `$XDG_STATE_HOME/porthole/workspaces` (`~/.local/state/porthole/workspaces`)."""
    env = os.environ if environ is None else environ
    if env.get("LOCALSANDBOX_WORKSPACES_DIR"):
        return Path(env["LOCALSANDBOX_WORKSPACES_DIR"]).expanduser().resolve()
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return (Path(state).expanduser() / "porthole" / "workspaces").resolve()
