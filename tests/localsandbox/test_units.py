"""The pure parts: the scrollback ring, subscribers, script parsing, agent choice."""

from __future__ import annotations

import asyncio

import pytest

from dashboard.localsandbox.launch import agent_env, choose_agent, initial_stdin
from dashboard.localsandbox.processes import exit_code_from_returncode
from dashboard.localsandbox.runner import ConfigurationError, ServerOptions, is_loopback, validate
from dashboard.localsandbox.streams import (
    STDERR,
    STDOUT,
    Chunk,
    Exited,
    OutputHub,
    ScrollbackRing,
    exit_frame,
)
from dashboard.localsandbox.wrappers.demo import (
    Exit,
    Fail,
    Flood,
    Say,
    Shell,
    Sleep,
    parse_script,
)


def test_it_evicts_the_oldest_chunks_past_capacity_and_says_so() -> None:
    ring = ScrollbackRing(capacity=10)
    for index in range(4):
        ring.append(Chunk(STDOUT, str(index).encode() * 4))
    assert [c.data for c in ring.snapshot()] == [b"2222", b"3333"]
    assert ring.truncated is True
    assert ring.size == 8


def test_it_does_not_flag_a_ring_that_never_overflowed() -> None:
    ring = ScrollbackRing(capacity=10)
    ring.append(Chunk(STDERR, b"0123456789"))
    assert ring.truncated is False


async def test_it_hands_each_chunk_to_either_the_replay_or_the_live_feed_once() -> None:
    hub = OutputHub()
    hub.publish(Chunk(STDOUT, b"old"))
    backlog, subscriber = hub.subscribe()
    hub.publish(Chunk(STDOUT, b"new"))
    hub.finish(0)
    assert [c.data for c in backlog] == [b"old"]
    assert await subscriber.next() == Chunk(STDOUT, b"new")
    assert await subscriber.next() == Exited(0)


async def test_it_drops_live_chunks_for_a_slow_subscriber_but_never_its_exit() -> None:
    hub = OutputHub(subscriber_limit=256)
    _, slow = hub.subscribe()
    _, fast = hub.subscribe()
    fast_received = []
    for index in range(300):
        hub.publish(Chunk(STDOUT, str(index).encode()))
        fast_received.append(await fast.next())
    hub.finish(137)

    slow_received = []
    while not isinstance(item := await asyncio.wait_for(slow.next(), 1), Exited):
        slow_received.append(item)
    assert len(slow_received) == 256 and slow.dropped == 44
    assert item == Exited(137)
    assert len(fast_received) == 300 and fast.dropped == 0
    assert len(hub.ring.snapshot()) == 300


async def test_it_gives_a_late_subscriber_of_an_exited_session_the_exit() -> None:
    hub = OutputHub()
    hub.publish(Chunk(STDOUT, b"done"))
    hub.finish(3)
    backlog, subscriber = hub.subscribe()
    assert [c.data for c in backlog] == [b"done"]
    assert await subscriber.next() == Exited(3)


def test_it_encodes_exit_frames_as_big_endian_signed_int32() -> None:
    assert exit_frame(0) == b"\x03\x00\x00\x00\x00"
    assert exit_frame(-1) == b"\x03\xff\xff\xff\xff"
    assert exit_frame(143) == b"\x03\x00\x00\x00\x8f"


def test_it_reports_signal_deaths_as_128_plus_the_signal() -> None:
    assert exit_code_from_returncode(-9) == 137
    assert exit_code_from_returncode(-15) == 143
    assert exit_code_from_returncode(2) == 2


def test_it_parses_demo_scripts_line_by_line() -> None:
    script = "\n".join(
        [
            "Intro *markdown*",
            "",
            "- item",
            "  $ ls -la  ",
            "sleep 2.5",
            "flood 10",
            "flood 3 64",
            "sleep soon",
            "fail",
            "fail out of disk",
            "exit 4",
            "exit 300",
            "tail",
        ]
    )
    assert parse_script(script) == [
        Say("Intro *markdown*\n\n- item"),
        Shell("ls -la"),
        Sleep(2.5),
        Flood(10, 200),
        Flood(3, 64),
        Say("sleep soon"),
        Fail("the demo script asked to fail"),
        Fail("out of disk"),
        Exit(4),
        Say("exit 300\ntail"),
    ]


def test_it_ignores_blank_text_between_instructions() -> None:
    assert parse_script("\n\n$ true\n   \n\n") == [Shell("true")]


@pytest.mark.parametrize(
    ("choice", "sandbox_envs", "server_env", "claude_installed", "expected"),
    [
        ("demo", {}, {"ANTHROPIC_API_KEY": "k"}, True, "demo"),
        ("claude", {}, {}, False, "claude"),
        ("auto", {}, {}, True, "demo"),
        ("auto", {}, {"ANTHROPIC_API_KEY": "k"}, True, "claude"),
        ("auto", {"ANTHROPIC_API_KEY": "k"}, {}, True, "claude"),
        ("auto", {}, {"ANTHROPIC_API_KEY": "k"}, False, "demo"),
    ],
)
def test_it_chooses_the_agent_wrapper(
    monkeypatch: pytest.MonkeyPatch,
    choice: str,
    sandbox_envs: dict[str, str],
    server_env: dict[str, str],
    claude_installed: bool,
    expected: str,
) -> None:
    monkeypatch.setattr(
        "dashboard.localsandbox.launch.claude_available", lambda _env: claude_installed
    )
    assert choose_agent(choice, sandbox_envs, server_env) == expected  # type: ignore[arg-type]


def test_it_writes_configure_only_when_an_option_is_set_then_the_prompt() -> None:
    assert initial_stdin({}, "go") == b'{"type": "prompt", "text": "go"}\n'
    assert initial_stdin({}, None) == b""
    assert initial_stdin({"model": "m", "maxTurns": 3}, None) == (
        b'{"type": "configure", "model": "m", "maxTurns": 3}\n'
    )


def test_it_refuses_to_expose_an_unauthenticated_server_beyond_loopback() -> None:
    for host in ("127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert not is_loopback(host)
    with pytest.raises(ConfigurationError, match="--api-key"):
        validate(ServerOptions(host="0.0.0.0"))
    validate(ServerOptions(host="0.0.0.0", api_key="secret"))


def test_it_gives_the_claude_wrapper_the_servers_anthropic_settings_unless_overridden() -> None:
    server = {"ANTHROPIC_API_KEY": "server-key", "ANTHROPIC_BASE_URL": "http://proxy"}
    claude = agent_env("claude", {"ANTHROPIC_API_KEY": "sandbox-key"}, server)
    assert claude["ANTHROPIC_API_KEY"] == "sandbox-key"
    assert claude["ANTHROPIC_BASE_URL"] == "http://proxy"
    assert "PYTHONPATH" not in claude  # the wrapper runs isolated (-I), not from a path
    demo = agent_env("demo", {}, server)
    assert "ANTHROPIC_API_KEY" not in demo and "ANTHROPIC_BASE_URL" not in demo
