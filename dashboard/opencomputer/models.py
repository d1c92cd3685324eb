"""Typed views of the API's JSON objects.

Each ``from_json`` reads the camelCase keys the API uses, tolerates extra keys and missing
optional ones, and keeps the whole object in ``raw``. Only the identifier is required: a
response without it raises :class:`~dashboard.opencomputer.errors.ProtocolError`.
``token`` (a per-sandbox credential) and ``raw`` (which may contain it) stay out of ``repr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self

from .errors import ProtocolError

__all__ = ["AgentSessionInfo", "ExecSessionInfo", "SandboxInfo", "parse_timestamp"]


def parse_timestamp(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp (``Z`` or offset) as an aware datetime; ``None`` if unparseable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _object(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"expected a JSON object for {what}, got {type(data).__name__}")
    return data


def _required_str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} without a {key!r}")
    return value


def _str(data: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else default


def _int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _bool(data: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = data.get(key)
    return value if isinstance(value, bool) else default


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    sandbox_id: str
    status: str
    template_id: str | None = None
    started_at: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    connect_url: str | None = None
    token: str | None = field(default=None, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, data: object) -> Self:
        obj = _object(data, "a sandbox")
        metadata = obj.get("metadata")
        return cls(
            sandbox_id=_required_str(obj, "sandboxID", "sandbox"),
            status=_str(obj, "status", "") or "",
            template_id=_str(obj, "templateID"),
            started_at=_str(obj, "startedAt"),
            metadata=(
                {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
            ),
            connect_url=_str(obj, "connectURL") or None,
            token=_str(obj, "token") or None,
            raw=dict(obj),
        )

    @property
    def started(self) -> datetime | None:
        return parse_timestamp(self.started_at)


@dataclass(frozen=True, slots=True)
class AgentSessionInfo:
    session_id: str
    sandbox_id: str
    running: bool
    started_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, data: object, sandbox_id: str = "") -> Self:
        """``sandbox_id`` fills in a response that omits ``sandboxID``."""
        obj = _object(data, "an agent session")
        return cls(
            session_id=_required_str(obj, "sessionID", "agent session"),
            sandbox_id=_str(obj, "sandboxID") or sandbox_id,
            running=_bool(obj, "running"),
            started_at=_str(obj, "startedAt"),
            raw=dict(obj),
        )

    @property
    def started(self) -> datetime | None:
        return parse_timestamp(self.started_at)


@dataclass(frozen=True, slots=True)
class ExecSessionInfo:
    session_id: str
    sandbox_id: str
    command: str
    args: tuple[str, ...] = ()
    running: bool = False
    exit_code: int | None = None
    started_at: str | None = None
    attached_clients: int = 0
    truncated: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, data: object, sandbox_id: str = "") -> Self:
        """``sandbox_id`` fills in a response that omits ``sandboxID``."""
        obj = _object(data, "an exec session")
        args = obj.get("args")
        return cls(
            session_id=_required_str(obj, "sessionID", "exec session"),
            sandbox_id=_str(obj, "sandboxID") or sandbox_id,
            command=_str(obj, "command", "") or "",
            args=tuple(str(a) for a in args) if isinstance(args, list) else (),
            running=_bool(obj, "running"),
            exit_code=_int(obj, "exitCode"),
            started_at=_str(obj, "startedAt"),
            attached_clients=_int(obj, "attachedClients") or 0,
            truncated=_bool(obj, "truncated"),
            raw=dict(obj),
        )

    @property
    def started(self) -> datetime | None:
        return parse_timestamp(self.started_at)
