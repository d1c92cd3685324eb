"""Which agent wrapper a sandbox runs, and how its process is started and first instructed."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
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
    """Isolated mode (`-I`, see wrappers/boot.py): the workspace is never on `sys.path`."""
    return [sys.executable, "-I", "-u", BOOT, f"dashboard.localsandbox.wrappers.{agent}"]


def agent_env(
    agent: AgentName, process_env: Mapping[str, str], server_env: Mapping[str, str]
) -> dict[str, str]:
    """The sandbox process environment plus the credentials the Claude wrapper needs."""
    env = dict(process_env)
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
