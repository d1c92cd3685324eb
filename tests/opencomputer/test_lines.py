"""Reassembling the wrapper's JSON lines from stdout chunks."""

from __future__ import annotations

import json

import pytest

from dashboard.opencomputer import JSONLineAssembler, Line, parse_line


def texts(lines: list[Line]) -> list[str]:
    return [line.text for line in lines]


def test_it_parses_one_line_per_frame() -> None:
    assembler = JSONLineAssembler()
    [line] = assembler.feed(b'{"type":"ready"}\n')
    assert line.data == {"type": "ready"}
    assert line.error is None
    assert line.type == "ready"
    assert not line.truncated
    assert assembler.pending == 0


def test_it_joins_a_line_split_across_frames() -> None:
    assembler = JSONLineAssembler()
    assert assembler.feed(b'{"type":"ass') == []
    assert assembler.feed(b'istant","n":') == []
    assert assembler.pending > 0
    [line] = assembler.feed(b"1}\n")
    assert line.data == {"type": "assistant", "n": 1}


def test_it_splits_many_lines_in_one_frame() -> None:
    chunk = b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(100))
    lines = JSONLineAssembler().feed(chunk)
    assert [line.data for line in lines] == [{"i": i} for i in range(100)]


def test_it_handles_lines_and_partials_in_every_split() -> None:
    payload = "".join(
        json.dumps({"i": i, "s": "é漢🙂"}, ensure_ascii=False) + "\n" for i in range(5)
    )
    data = payload.encode()
    for cut in range(len(data) + 1):
        assembler = JSONLineAssembler()
        lines = assembler.feed(data[:cut]) + assembler.feed(data[cut:])
        assert [line.data for line in lines] == [{"i": i, "s": "é漢🙂"} for i in range(5)], cut


def test_it_does_not_mangle_a_multibyte_character_split_across_frames() -> None:
    encoded = '{"text":"🙂"}\n'.encode()
    start = encoded.index("🙂".encode())
    assembler = JSONLineAssembler()
    out: list[Line] = []
    for i in range(len(encoded)):  # one byte per frame, the emoji's 4 bytes in 4 frames
        out += assembler.feed(encoded[i : i + 1])
    assert start > 0
    [line] = out
    assert line.data == {"text": "🙂"}
    assert "\ufffd" not in line.text


def test_it_strips_crlf() -> None:
    lines = JSONLineAssembler().feed(b'{"a":1}\r\n{"b":2}\r\n')
    assert [line.data for line in lines] == [{"a": 1}, {"b": 2}]
    assert texts(lines) == ['{"a":1}', '{"b":2}']


def test_it_handles_a_cr_and_lf_split_across_frames() -> None:
    assembler = JSONLineAssembler()
    assert assembler.feed(b'{"a":1}\r') == []
    [line] = assembler.feed(b"\n")
    assert line.data == {"a": 1}


def test_it_skips_blank_lines() -> None:
    lines = JSONLineAssembler().feed(b'\n\n  \r\n{"a":1}\n\t\n')
    assert [line.data for line in lines] == [{"a": 1}]


def test_it_reports_non_json_lines() -> None:
    [line] = JSONLineAssembler().feed(b"Traceback (most recent call last):\n")
    assert line.data is None
    assert line.error is not None and line.error.startswith("not JSON")
    assert line.text == "Traceback (most recent call last):"
    assert line.type is None


@pytest.mark.parametrize(
    ("text", "kind"),
    [("[1,2]", "array"), ('"s"', "string"), ("3", "number"), ("null", "null"), ("true", "boolean")],
)
def test_it_reports_json_that_is_not_an_object(text: str, kind: str) -> None:
    line = parse_line(text)
    assert line.data is None
    assert line.error == f"JSON but not an object ({kind})"


def test_it_survives_absurdly_nested_json() -> None:
    line = parse_line("[" * 100_000 + "]" * 100_000)
    assert line.data is None and line.error is not None


def test_it_replaces_invalid_utf8() -> None:
    [bad, good] = JSONLineAssembler().feed(b'{"a":"\xff\xfe"}\n{"b":1}\n')
    assert bad.data == {"a": "\ufffd\ufffd"}
    assert good.data == {"b": 1}
    [raw] = JSONLineAssembler().feed(b"\xc3\x28 nope\n")
    assert raw.data is None and "\ufffd" in raw.text


def test_it_keeps_a_type_that_is_not_a_string_out_of_type() -> None:
    [line] = JSONLineAssembler().feed(b'{"type": 5}\n')
    assert line.data == {"type": 5}
    assert line.type is None


def test_it_flushes_an_unterminated_last_line() -> None:
    assembler = JSONLineAssembler()
    assert assembler.feed(b'{"type":"result"}') == []
    [line] = assembler.flush()
    assert line.data == {"type": "result"}
    assert assembler.pending == 0
    assert assembler.flush() == []


def test_it_flushes_nothing_for_whitespace() -> None:
    assembler = JSONLineAssembler()
    assembler.feed(b"  \r")
    assert assembler.flush() == []


def test_it_resets_a_partial_line() -> None:
    assembler = JSONLineAssembler()
    assembler.feed(b'{"type":"assistant","half')
    assembler.reset()
    assert assembler.pending == 0
    # Scrollback replays from a line start after a reconnect.
    [line] = assembler.feed(b'{"type":"ready"}\n')
    assert line.data == {"type": "ready"}


def test_it_caps_an_oversize_unterminated_line() -> None:
    assembler = JSONLineAssembler(max_line_bytes=1024)
    assert assembler.feed(b'{"x":"' + b"a" * 1000) == []
    [line] = assembler.feed(b"a" * 1000)
    assert line.truncated
    assert line.data is None
    assert line.error is not None and "truncated" in line.error
    assert len(line.text) == 1024
    assert assembler.pending == 0
    # The rest of the oversize line is dropped, however long, without buffering it.
    for _ in range(50):
        assert assembler.feed(b"b" * 4096) == []
        assert assembler.pending == 0
    [after] = assembler.feed(b'bbb"}\n{"next":true}\n')
    assert after.data == {"next": True}


def test_it_caps_an_oversize_line_that_arrives_complete() -> None:
    assembler = JSONLineAssembler(max_line_bytes=100)
    lines = assembler.feed(b"x" * 500 + b'\n{"ok":1}\n')
    assert [line.truncated for line in lines] == [True, False]
    assert len(lines[0].text) == 100
    assert lines[1].data == {"ok": 1}


def test_it_keeps_a_line_exactly_at_the_cap() -> None:
    body = b'{"x":"' + b"a" * 92 + b'"}'
    assert len(body) == 100
    [line] = JSONLineAssembler(max_line_bytes=100).feed(body + b"\n")
    assert not line.truncated and line.data == {"x": "a" * 92}


def test_it_resets_out_of_a_discarded_line() -> None:
    assembler = JSONLineAssembler(max_line_bytes=10)
    [line] = assembler.feed(b"z" * 20)
    assert line.truncated
    assembler.reset()
    [line] = assembler.feed(b'{"a":1}\n')
    assert line.data == {"a": 1}


def test_it_defaults_to_an_eight_mib_cap() -> None:
    assembler = JSONLineAssembler()
    assert assembler.max_line_bytes == 8 * 1024 * 1024
    big = json.dumps({"blob": "x" * (2 * 1024 * 1024)}).encode() + b"\n"
    out: list[Line] = []
    for i in range(0, len(big), 65536):
        out += assembler.feed(big[i : i + 65536])
    [line] = out
    assert line.data is not None and len(line.data["blob"]) == 2 * 1024 * 1024


def test_it_accepts_memoryview_and_bytearray() -> None:
    assembler = JSONLineAssembler()
    assert assembler.feed(memoryview(b'{"a":')) == []
    [line] = assembler.feed(bytearray(b"1}\n"))
    assert line.data == {"a": 1}
