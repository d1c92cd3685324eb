"""Reassembling the agent wrapper's JSON lines from stdout frames.

A line may span frames and a frame may hold many lines; a frame boundary may even fall
inside a multi-byte UTF-8 character. :class:`JSONLineAssembler` buffers bytes and decodes
only complete lines, so a split character is never mangled. Invalid UTF-8 is replaced, not
fatal. A pathological line with no newline is capped: once it passes ``max_line_bytes`` its
first ``max_line_bytes`` are emitted as a truncated, non-JSON line and the rest of it (up to
the next newline) is discarded, so memory stays bounded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_MAX_LINE_BYTES", "JSONLineAssembler", "Line", "parse_line"]

DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Line:
    """One stdout line.

    ``data`` is the parsed object when the line is a JSON object; otherwise it is ``None`` and
    ``error`` says why (not JSON, JSON but not an object, truncated). ``text`` is the decoded
    line without its line ending (for a truncated line: its first ``max_line_bytes``).
    """

    text: str
    data: dict[str, Any] | None = field(default=None, hash=False)
    error: str | None = None
    truncated: bool = False

    @property
    def type(self) -> str | None:
        """The object's ``type`` when it is a string, else ``None``."""
        if self.data is None:
            return None
        value = self.data.get("type")
        return value if isinstance(value, str) else None


def parse_line(text: str) -> Line:
    """Classify one complete, non-blank line of text."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        return Line(text=text, error=f"not JSON: {exc}")
    except RecursionError:
        return Line(text=text, error="not JSON: nested too deeply")
    if not isinstance(value, dict):
        return Line(text=text, error=f"JSON but not an object ({_json_kind(value)})")
    return Line(text=text, data=value)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


class JSONLineAssembler:
    """Turns a stream of stdout chunks into :class:`Line` objects.

    Not thread-safe; one per stream. Blank (whitespace-only) lines are skipped; a trailing
    ``\\r`` is dropped (CRLF).
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._discarding = False  # inside an oversize line already emitted as truncated

    @property
    def pending(self) -> int:
        """Bytes buffered for an incomplete line."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Line]:
        """Add a chunk; return the lines it completes, in order."""
        chunk = data.tobytes() if isinstance(data, memoryview) else data
        out: list[Line] = []
        if self._discarding:
            newline = chunk.find(b"\n")
            if newline < 0:
                return out
            chunk = chunk[newline + 1 :]
            self._discarding = False
        if not chunk:
            return out
        start = len(self._buf)
        self._buf += chunk
        last = self._buf.rfind(b"\n", start)
        if last >= 0:
            complete = bytes(self._buf[:last])
            del self._buf[: last + 1]
            for raw in complete.split(b"\n"):
                self._emit(raw, out)
        if len(self._buf) > self.max_line_bytes:
            head = bytes(self._buf[: self.max_line_bytes])
            self._buf.clear()
            self._discarding = True
            out.append(self._truncated(head))
        return out

    def peek(self) -> bytes:
        """The bytes buffered for the incomplete line (empty when discarding an oversize one)."""
        return bytes(self._buf)

    def flush(self) -> list[Line]:
        """End of stream: return the unterminated last line, if any, and empty the buffer."""
        out: list[Line] = []
        raw = bytes(self._buf)
        self.reset()
        self._emit(raw, out)
        return out

    def reset(self) -> None:
        """Drop any partial line (e.g. before a reconnect replays scrollback)."""
        self._buf.clear()
        self._discarding = False

    def _emit(self, raw: bytes, out: list[Line]) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            return
        if len(raw) > self.max_line_bytes:
            out.append(self._truncated(raw[: self.max_line_bytes]))
            return
        out.append(parse_line(raw.decode("utf-8", errors="replace")))

    def _truncated(self, head: bytes) -> Line:
        return Line(
            text=head.decode("utf-8", errors="replace"),
            error=f"line longer than {self.max_line_bytes} bytes; truncated",
            truncated=True,
        )
