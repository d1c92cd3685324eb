"""Which agent wrapper a sandbox runs, and how its process is started and first instructed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from . import isolation
from .wrappers.claude_code import find_cli
from .wrappers.protocol import config_from

AgentName = Literal["claude", "demo"]
AgentChoice = Literal["auto", "claude", "demo"]
AGENT_CHOICES: tuple[AgentChoice, ...] = ("auto", "claude", "demo")

BOOT = str(isolation.PACKAGE_DIR / "wrappers" / "boot.py")
# Credentials the Claude wrapper needs; taken from the server unless the sandbox sets them.
CLAUDE_PASSTHROUGH = ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


def claude_cli(server_env: Mapping[str, str]) -> Path | None:
    """The Claude Code CLI this server finds (`$CLAUDE_CODE_CLI`, its PATH, claude-agent-sdk's),
    resolved: the one sandboxes get, bound read-only (see `cli_binds`) and named to the wrapper
    in `CLAUDE_CODE_CLI`, since the sandbox sees neither the server's PATH nor its home."""
    found = find_cli(server_env)
    if found is None:
        return None
    path = Path(found).resolve()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def cli_binds(cli: Path | None) -> tuple[Path, ...]:
    """What a sandbox needs to see to run `cli`: a native build is one file; an npm install's
    `cli.js` needs its package directory (never more: a home directory stays hidden)."""
    if cli is None:
        return ()
    return (cli.parent,) if cli.suffix in (".js", ".mjs", ".cjs") else (cli,)


def claude_available(server_env: Mapping[str, str]) -> bool:
    return claude_cli(server_env) is not None


def choose_agent(
    choice: AgentChoice, sandbox_envs: Mapping[str, str], server_env: Mapping[str, str]
) -> AgentName:
    """`auto` means Claude when there is a key for it and a CLI to run, else the demo."""
    if choice != "auto":
        return choice
    has_key = bool(sandbox_envs.get("ANTHROPIC_API_KEY") or server_env.get("ANTHROPIC_API_KEY"))
    return "claude" if has_key and claude_available(server_env) else "demo"


def agent_argv(agent: AgentName) -> list[str]:
    """Isolated mode (`-I`, see wrappers/boot.py): the workspace is never on `sys.path`."""
    return [sys.executable, "-I", "-u", BOOT, f"dashboard.localsandbox.wrappers.{agent}"]


def agent_env(
    agent: AgentName,
    process_env: Mapping[str, str],
    server_env: Mapping[str, str],
    cli: Path | None = None,
) -> dict[str, str]:
    """The sandbox process environment plus what the Claude wrapper needs: the credentials
    and the CLI the server found (unless the sandbox sets them)."""
    env = dict(process_env)
    if agent == "claude" and cli is not None:
        env.setdefault("CLAUDE_CODE_CLI", str(cli))
    if agent == "claude":
        for name in CLAUDE_PASSTHROUGH:
            if name not in env and server_env.get(name):
                env[name] = server_env[name]
    return env


def initial_stdin(options: Mapping[str, Any], prompt: str | None) -> bytes:
    """The `configure` line (when any option is set) and then the `prompt` line (when given)."""
    lines: list[dict[str, Any]] = []
    config = config_from(dict(options))
    if config:
        lines.append({"type": "configure", **config})
    if prompt is not None:
        lines.append({"type": "prompt", "text": prompt})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)
