"""Parsing the API's JSON objects."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dashboard.opencomputer import (
    AgentSessionInfo,
    ExecSessionInfo,
    ProtocolError,
    SandboxInfo,
    parse_timestamp,
)


def test_it_parses_a_sandbox_and_hides_its_token() -> None:
    data = {
        "sandboxID": "sb-1",
        "status": "running",
        "templateID": "base",
        "startedAt": "2025-01-02T03:04:05Z",
        "metadata": {"owner": "me", "n": 3},
        "connectURL": "http://127.0.0.1:9/api",
        "token": "tok-secret",
        "endAt": None,
        "new": 1,
    }
    info = SandboxInfo.from_json(data)
    assert info.sandbox_id == "sb-1" and info.status == "running" and info.template_id == "base"
    assert info.metadata == {"owner": "me", "n": "3"}
    assert info.connect_url == "http://127.0.0.1:9/api"
    assert info.token == "tok-secret"
    assert info.raw["new"] == 1
    assert info.started == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert "tok-secret" not in repr(info)
    hash(info)
    with pytest.raises(AttributeError):
        info.status = "x"  # type: ignore[misc]


def test_it_tolerates_missing_optional_fields() -> None:
    info = SandboxInfo.from_json({"sandboxID": "sb-2"})
    assert (info.status, info.template_id, info.started_at, info.metadata) == ("", None, None, {})
    assert info.connect_url is None and info.token is None and info.started is None
    agent = AgentSessionInfo.from_json({"sessionID": "a"}, sandbox_id="sb-2")
    assert (agent.sandbox_id, agent.running, agent.started_at) == ("sb-2", False, None)
    exec_ = ExecSessionInfo.from_json({"sessionID": "e", "exitCode": None, "args": None})
    assert (exec_.command, exec_.args, exec_.exit_code, exec_.attached_clients) == ("", (), None, 0)
    assert exec_.truncated is False


def test_it_parses_an_exec_session() -> None:
    info = ExecSessionInfo.from_json(
        {
            "sessionID": "e1",
            "sandboxID": "sb",
            "command": "python",
            "args": ["-m", "x"],
            "running": False,
            "exitCode": -9,
            "startedAt": "2025-01-02T03:04:05.123456+00:00",
            "attachedClients": 2,
            "truncated": True,
        }
    )
    assert info.args == ("-m", "x") and info.exit_code == -9 and info.attached_clients == 2
    assert info.truncated and not info.running
    assert info.started is not None and info.started.microsecond == 123456
    hash(info)


def test_it_ignores_wrongly_typed_fields() -> None:
    info = ExecSessionInfo.from_json({"sessionID": "e", "running": "yes", "exitCode": True})
    assert info.running is False and info.exit_code is None


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (SandboxInfo, {"status": "running"}),
        (SandboxInfo, {"sandboxID": ""}),
        (SandboxInfo, ["sb-1"]),
        (AgentSessionInfo, {"sandboxID": "x"}),
        (ExecSessionInfo, None),
    ],
)
def test_it_requires_the_identifier(cls: type[SandboxInfo], data: object) -> None:
    with pytest.raises(ProtocolError):
        cls.from_json(data)


def test_it_parses_timestamps_leniently() -> None:
    assert parse_timestamp(None) is None
    assert parse_timestamp("yesterday") is None
    assert parse_timestamp("2025-01-02T03:04:05+02:00") == datetime(2025, 1, 2, 1, 4, 5, tzinfo=UTC)
