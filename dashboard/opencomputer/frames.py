"""The exec WebSocket's binary frame codec.

Every message is binary and byte 0 names the stream:

======  ================  =====================================================
byte    direction         payload
======  ================  =====================================================
0x00    client → server   bytes for the process's stdin
0x01    server → client   stdout bytes
0x02    server → client   stderr bytes
0x03    server → client   exit code: 4-byte big-endian signed int32
0x04    server → client   end of scrollback replay (no payload)
======  ================  =====================================================

Decisions where the protocol is silent:

* An exit payload shorter than 4 bytes decodes as ``Exit(EXIT_UNKNOWN)`` (-1): the process
  did exit but its code is unknown. (The official Python SDK reports 0 there, which would
  claim a success nobody saw.) Bytes past the first 4 are ignored.
* A scrollback-end frame with a payload is still a scrollback end; the payload is ignored.
* Empty messages and unknown stream bytes decode as ``None``; :func:`decode_frame` never
  raises.

All functions are pure; the embedded server may use the encoders.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "EXIT",
    "EXIT_UNKNOWN",
    "SCROLLBACK_END",
    "STDERR",
    "STDIN",
    "STDOUT",
    "ClientFrame",
    "Exit",
    "Frame",
    "ScrollbackEnd",
    "ServerFrame",
    "Stderr",
    "Stdin",
    "Stdout",
    "decode_frame",
    "encode_exit",
    "encode_frame",
    "encode_scrollback_end",
    "encode_stderr",
    "encode_stdin",
    "encode_stdout",
]

STDIN = 0x00
STDOUT = 0x01
STDERR = 0x02
EXIT = 0x03
SCROLLBACK_END = 0x04

#: The code an exit frame without a full 4-byte payload decodes to.
EXIT_UNKNOWN = -1

_INT32 = struct.Struct(">i")


@dataclass(frozen=True, slots=True)
class Stdin:
    """Bytes for the process's stdin (client → server)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stdout:
    """Bytes the process wrote to stdout."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    """Bytes the process wrote to stderr."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Exit:
    """The process exited with ``code``; the server closes the socket next."""

    code: int


@dataclass(frozen=True, slots=True)
class ScrollbackEnd:
    """The replay of buffered output is over; live frames follow."""


ServerFrame = Stdout | Stderr | Exit | ScrollbackEnd
ClientFrame = Stdin
Frame = Stdin | Stdout | Stderr | Exit | ScrollbackEnd

Buffer = bytes | bytearray | memoryview


def decode_frame(message: Buffer) -> Frame | None:
    """Decode one binary WebSocket message; ``None`` if it is empty or names no known stream."""
    if not message:
        return None
    view = memoryview(message)
    stream = view[0]
    if stream == STDOUT:
        return Stdout(bytes(view[1:]))
    if stream == STDERR:
        return Stderr(bytes(view[1:]))
    if stream == EXIT:
        if len(view) < 5:
            return Exit(EXIT_UNKNOWN)
        return Exit(_INT32.unpack_from(view, 1)[0])
    if stream == SCROLLBACK_END:
        return ScrollbackEnd()
    if stream == STDIN:
        return Stdin(bytes(view[1:]))
    return None


def encode_stdin(data: Buffer) -> bytes:
    return bytes((STDIN,)) + bytes(data)


def encode_stdout(data: Buffer) -> bytes:
    return bytes((STDOUT,)) + bytes(data)


def encode_stderr(data: Buffer) -> bytes:
    return bytes((STDERR,)) + bytes(data)


def encode_exit(code: int) -> bytes:
    """The exit frame; ``code`` must fit a signed int32 (else :class:`ValueError`)."""
    if not -(2**31) <= code < 2**31:
        raise ValueError(f"exit code {code} does not fit a signed int32")
    return bytes((EXIT,)) + _INT32.pack(code)


def encode_scrollback_end() -> bytes:
    return bytes((SCROLLBACK_END,))


def encode_frame(frame: Frame) -> bytes:
    """Encode any typed frame."""
    match frame:
        case Stdin(data):
            return encode_stdin(data)
        case Stdout(data):
            return encode_stdout(data)
        case Stderr(data):
            return encode_stderr(data)
        case Exit(code):
            return encode_exit(code)
        case ScrollbackEnd():
            return encode_scrollback_end()
    raise TypeError(f"not a frame: {frame!r}")
