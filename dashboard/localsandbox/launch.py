"""Which agent wrapper a sandbox runs, and how its process is started and first instructed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from . import isolation
from .wrappers.claude_code import find_cli
from .wrappers.protocol import config_from

AgentName = Literal["claude", "demo"]
AgentChoice = Literal["auto", "claude", "demo"]
AGENT_CHOICES: tuple[AgentChoice, ...] = ("auto", "claude", "demo")

# The directory that holds the `dashboard` package, so `-m dashboard.localsandbox...` imports.
PROJECT_ROOT = str(isolation.PROJECT_ROOT)
# Credentials the Claude wrapper needs; taken from the server unless the sandbox sets them.
CLAUDE_PASSTHROUGH = ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


def claude_available() -> bool:
    """The Claude wrapper can run: it finds the Claude Code CLI (on PATH or claude-agent-sdk's)."""
    return find_cli() is not None


def choose_agent(
    choice: AgentChoice, sandbox_envs: Mapping[str, str], server_env: Mapping[str, str]
) -> AgentName:
    """`auto` means Claude when there is a key for it and its SDK is installed, else the demo."""
    if choice != "auto":
        return choice
    has_key = bool(sandbox_envs.get("ANTHROPIC_API_KEY") or server_env.get("ANTHROPIC_API_KEY"))
    return "claude" if has_key and claude_available() else "demo"


def agent_argv(agent: AgentName) -> list[str]:
    return [sys.executable, "-m", f"dashboard.localsandbox.wrappers.{agent}"]


def agent_env(
    agent: AgentName, process_env: Mapping[str, str], server_env: Mapping[str, str]
) -> dict[str, str]:
    """The sandbox process environment plus what the wrapper itself needs to run."""
    env = dict(process_env)
    inherited_path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = PROJECT_ROOT + (os.pathsep + inherited_path if inherited_path else "")
    env["PYTHONUNBUFFERED"] = "1"
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
