"""The in-sandbox agent wrapper's line protocol, shared by every wrapper.

stdin carries one JSON object per line: `configure`, `prompt` and `interrupt`.
stdout carries one JSON object per line: `ready`, `configured`, the Claude Agent SDK's
messages, `turn_complete`, `interrupted` and `error`. stderr is the wrapper's own log.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

CONFIG_KEYS = (
    "model",
    "systemPrompt",
    "allowedTools",
    "permissionMode",
    "maxTurns",
    "cwd",
    "mcpServers",
    "resume",
)


class Output:
    """Writes protocol lines to stdout; every line is flushed at once so viewers see it live."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream or sys.stdout

    def emit(self, message: dict[str, Any]) -> None:
        self._stream.write(json.dumps(message, ensure_ascii=False, default=str) + "\n")
        self._stream.flush()

    def error(self, message: str) -> None:
        self.emit({"type": "error", "message": message})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def stdin_commands() -> AsyncIterator[dict[str, Any]]:
    """Yield each stdin line as a dict; malformed lines are reported as `error` and skipped."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", buffering=0)
    )
    out = Output()
    while True:
        line = await reader.readline()
        if not line:
            return
        text = line.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            command = json.loads(text)
        except json.JSONDecodeError:
            out.error(f"stdin line is not JSON: {text[:200]}")
            continue
        if not isinstance(command, dict) or not isinstance(command.get("type"), str):
            out.error("stdin line must be a JSON object with a string `type`")
            continue
        yield command


def config_from(command: dict[str, Any]) -> dict[str, Any]:
    """The configuration keys a `configure` (or agent-create) message sets, unknown keys dropped."""
    return {key: command[key] for key in CONFIG_KEYS if command.get(key) is not None}
