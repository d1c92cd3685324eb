"""The exec WebSocket: scrollback replay, live output, stdin, several clients, exit."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.conftest import LocalSandbox
from tests.localsandbox.helpers import (
    STDERR,
    STDOUT,
    Stream,
    eventually,
    session_info,
    start_exec,
    stream_url,
    wait_session_exited,
)

MIB = 1024 * 1024


async def test_it_replays_scrollback_then_marks_the_start_of_live_output(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "echo before; echo oops >&2; read x; echo after:$x")
    # Wait until the early output is in the ring, then attach: it must come back as replay.
    first = await Stream.open(stream_url(localsandbox, sandbox_id, session["sessionID"]))
    await first.wait_for(lambda s: b"oops" in s.output(STDERR) and b"before" in s.output())
    await first.close()

    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session["sessionID"]))
    await stream.wait_for(lambda s: s.replay_end is not None)
    assert stream.replayed(STDOUT) == b"before\n"
    assert stream.replayed(STDERR) == b"oops\n"
    await stream.send_stdin(b"now\n")
    assert await stream.wait_exit() == 0
    assert stream.live(STDOUT) == b"after:now\n"
    assert stream.frames[-1] == b"\x03\x00\x00\x00\x00"
    await stream.closed.wait()  # the server closes after the exit frame


async def test_it_replays_an_exited_session_then_sends_the_end_marker_and_exit(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "echo finished; exit 3")
    await wait_session_exited(api, sandbox_id, session["sessionID"])

    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session["sessionID"]))
    await asyncio.wait_for(stream.closed.wait(), 10)
    assert stream.frames == [b"\x01finished\n", b"\x04", b"\x03\x00\x00\x00\x03"]


async def test_it_keeps_only_the_last_mebibyte_and_flags_the_listing_as_truncated(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    response = await api.post(
        f"/sandboxes/{sandbox_id}/agent", json={"prompt": "flood 2600 400\nlast words\nexit 0"}
    )
    session_id = response.json()["sessionID"]
    info = await wait_session_exited(api, sandbox_id, session_id, timeout=30)
    assert info["truncated"] is True
    agents = (await api.get(f"/sandboxes/{sandbox_id}/agent")).json()
    assert [a["truncated"] for a in agents if a["sessionID"] == session_id] == [True]

    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session_id))
    await stream.wait_exit()
    replay = stream.replayed(STDOUT) + stream.replayed(STDERR)
    assert MIB - 64 * 1024 < len(replay) <= MIB
    # It starts mid-stream: the first lines (`ready`, the init) are gone, the end is there.
    assert not stream.replayed(STDOUT).startswith(b'{"type": "ready"}')
    assert b'"flood 1/2600 ' not in stream.replayed(STDOUT)
    assert b"last words" in stream.replayed(STDOUT)


async def test_it_does_not_flag_short_output_as_truncated(
    api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "echo short")
    info = await wait_session_exited(api, sandbox_id, session["sessionID"])
    assert info["truncated"] is False


async def test_it_sends_identical_output_to_two_attached_clients(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    script = 'read go; i=0; while [ $i -lt 3000 ]; do echo "line $i"; i=$((i+1)); done'
    session = await start_exec(api, sandbox_id, script)
    url = stream_url(localsandbox, sandbox_id, session["sessionID"])
    first, second = await Stream.open(url), await Stream.open(url)
    for stream in (first, second):
        await stream.wait_for(lambda s: s.replay_end is not None)
    info = await session_info(api, sandbox_id, session["sessionID"])
    assert info["attachedClients"] == 2

    await first.send_stdin(b"go\n")
    assert await first.wait_exit() == 0
    assert await second.wait_exit() == 0
    expected = "".join(f"line {i}\n" for i in range(3000)).encode()
    assert first.output() == second.output() == expected


async def test_it_passes_stdin_from_every_attached_client(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "read a; echo A=$a; read b; echo B=$b")
    url = stream_url(localsandbox, sandbox_id, session["sessionID"])
    first, second = await Stream.open(url), await Stream.open(url)
    await first.send_stdin(b"one\n")
    await second.wait_for(lambda s: b"A=one" in s.output())
    await second.send_stdin(b"two\n")
    assert await first.wait_exit() == 0
    assert await second.wait_exit() == 0
    assert first.output() == second.output() == b"A=one\nB=two\n"


async def test_it_keeps_the_session_running_when_a_client_disconnects_mid_stream(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "echo started; read x; echo resumed:$x")
    url = stream_url(localsandbox, sandbox_id, session["sessionID"])
    leaving = await Stream.open(url)
    await leaving.wait_for(lambda s: b"started" in s.output())
    leaving.connection.transport.abort()  # vanish without a close handshake

    async def detached() -> bool:
        info = await session_info(api, sandbox_id, session["sessionID"])
        assert info["running"] is True
        return info["attachedClients"] == 0

    await eventually(detached, what="the server to notice the client left")
    staying = await Stream.open(url)
    await staying.send_stdin(b"yes\n")
    assert await staying.wait_exit() == 0
    assert staying.output() == b"started\nresumed:yes\n"


async def test_it_ignores_unknown_stream_bytes_empty_and_text_frames(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "read x; echo got:$x")
    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session["sessionID"]))
    await stream.connection.send(b"")
    await stream.connection.send(b"\x07junk\n")
    await stream.connection.send(b"\x01also junk\n")
    await stream.connection.send("text is not a stream frame\n")
    await stream.send_stdin(b"real\n")
    assert await stream.wait_exit() == 0
    assert stream.output() == b"got:real\n"


async def test_it_reports_a_signal_kill_as_128_plus_the_signal(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    session = await start_exec(api, sandbox_id, "echo up; exec sleep 300")
    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session["sessionID"]))
    await stream.wait_for(lambda s: b"up" in s.output())
    kill = await api.post(
        f"/sandboxes/{sandbox_id}/exec/{session['sessionID']}/kill", json={"signal": 15}
    )
    assert kill.status_code == 204
    assert await stream.wait_exit() == 128 + 15
    info = await session_info(api, sandbox_id, session["sessionID"])
    assert (info["running"], info["exitCode"]) == (False, 143)


async def test_it_drops_live_output_for_a_client_that_stops_reading(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    total = 64 * MIB
    session = await start_exec(api, sandbox_id, f"read go; head -c {total} /dev/zero")
    url = stream_url(localsandbox, sandbox_id, session["sessionID"])
    # max_queue=1: this client's socket stops being read almost at once.
    stalled = await Stream.open(url, max_queue=1)
    stalled._reader.cancel()  # and nothing reads its frames any more
    await stalled.send_stdin(b"go\n")

    # The process's reader never waits for the stalled client: the session ends promptly.
    info = await wait_session_exited(api, sandbox_id, session["sessionID"], timeout=30)
    assert info["exitCode"] == 0

    received = 0
    exit_frame = None
    async for frame in stalled.connection:
        if frame[0] == STDOUT:
            received += len(frame) - 1
        elif frame[0] == 0x03:
            exit_frame = frame
            break
    # Most of the output was dropped for it (beyond its 256-chunk buffer and the socket's),
    # but the exit notice never is.
    assert received < total / 2
    assert exit_frame == b"\x03\x00\x00\x00\x00"


async def test_it_streams_an_agent_session_under_the_agent_path_too(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    created = await api.post(f"/sandboxes/{sandbox_id}/agent", json={"prompt": "hi there"})
    session_id = created.json()["sessionID"]
    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session_id, kind="agent"))
    await stream.wait_for(lambda s: any(e["type"] == "turn_complete" for e in s.events()))
    texts = [
        e["message"]["content"][0]["text"] for e in stream.events() if e["type"] == "assistant"
    ]
    assert texts == ["hi there"]
    kill = await api.post(f"/sandboxes/{sandbox_id}/agent/{session_id}/kill", json={})
    assert kill.status_code == 204
    assert await stream.wait_exit() == 128 + 9
    assert json.loads(stream.output().split(b"\n")[0]) == {"type": "ready"}
