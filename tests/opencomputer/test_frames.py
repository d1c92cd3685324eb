"""The exec WebSocket frame codec."""

from __future__ import annotations

import pytest

from dashboard.opencomputer import (
    EXIT_UNKNOWN,
    Exit,
    ScrollbackEnd,
    Stderr,
    Stdin,
    Stdout,
    decode_frame,
    encode_exit,
    encode_frame,
    encode_scrollback_end,
    encode_stderr,
    encode_stdin,
    encode_stdout,
)


def test_it_decodes_every_stream_byte() -> None:
    assert decode_frame(b"\x00typed") == Stdin(b"typed")
    assert decode_frame(b"\x01out\n") == Stdout(b"out\n")
    assert decode_frame(b"\x02err") == Stderr(b"err")
    assert decode_frame(b"\x03\x00\x00\x00\x07") == Exit(7)
    assert decode_frame(b"\x04") == ScrollbackEnd()


def test_it_decodes_empty_payloads() -> None:
    assert decode_frame(b"\x01") == Stdout(b"")
    assert decode_frame(b"\x02") == Stderr(b"")
    assert decode_frame(b"\x00") == Stdin(b"")


@pytest.mark.parametrize("code", [0, 1, 2, 127, 137, 255, -1, -9, -15, 2**31 - 1, -(2**31)])
def test_it_round_trips_signed_exit_codes(code: int) -> None:
    frame = encode_exit(code)
    assert len(frame) == 5
    assert frame[1:] == code.to_bytes(4, "big", signed=True)
    assert decode_frame(frame) == Exit(code)


def test_it_reads_negative_exit_codes_as_signed() -> None:
    assert decode_frame(b"\x03\xff\xff\xff\xff") == Exit(-1)
    assert decode_frame(b"\x03\xff\xff\xff\xf7") == Exit(-9)
    assert decode_frame(b"\x03\x80\x00\x00\x00") == Exit(-(2**31))


def test_it_decodes_a_short_exit_payload_as_unknown() -> None:
    assert decode_frame(b"\x03") == Exit(EXIT_UNKNOWN)
    assert decode_frame(b"\x03\x00\x00\x01") == Exit(EXIT_UNKNOWN)
    # Bytes past the int32 are ignored.
    assert decode_frame(b"\x03\x00\x00\x00\x02extra") == Exit(2)


def test_it_ignores_a_scrollback_end_payload() -> None:
    assert decode_frame(b"\x04junk") == ScrollbackEnd()


@pytest.mark.parametrize("message", [b"", b"\x05", b"\x05data", b"\xff\x00", b"{", b"\x7f"])
def test_it_returns_none_for_empty_or_unknown_frames(message: bytes) -> None:
    assert decode_frame(message) is None


def test_it_accepts_bytearray_and_memoryview() -> None:
    assert decode_frame(bytearray(b"\x01abc")) == Stdout(b"abc")
    assert decode_frame(memoryview(b"xx\x02abc")[2:]) == Stderr(b"abc")
    frame = decode_frame(memoryview(b"\x01abc"))
    assert isinstance(frame, Stdout) and type(frame.data) is bytes


def test_it_encodes_every_frame() -> None:
    assert encode_stdin(b'{"type":"interrupt"}\n') == b'\x00{"type":"interrupt"}\n'
    assert encode_stdout(b"x") == b"\x01x"
    assert encode_stderr(bytearray(b"y")) == b"\x02y"
    assert encode_scrollback_end() == b"\x04"
    assert encode_exit(137) == b"\x03\x00\x00\x00\x89"
    for frame in (Stdin(b"a"), Stdout(b"b"), Stderr(b""), Exit(-3), ScrollbackEnd()):
        assert decode_frame(encode_frame(frame)) == frame


def test_it_keeps_large_payloads_intact() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, every byte value
    assert decode_frame(encode_stdout(payload)) == Stdout(payload)


@pytest.mark.parametrize("code", [2**31, -(2**31) - 1])
def test_it_refuses_exit_codes_outside_int32(code: int) -> None:
    with pytest.raises(ValueError):
        encode_exit(code)
