"""Masking the secrets Porthole hands to sandboxes out of everything a sandbox prints.

A sandbox's processes can read what they were given (the agent's environment, the
embedded server's), so an agent may print a key: by accident (`env`), or on purpose in a
form meant to slip past a filter. Everything is masked *before it is stored*, so no page,
fragment, socket or export ever has the clear value to show.

What is masked, for each secret of at least `MIN_SECRET` characters:
- the value as is, JSON-escaped, fully `\\u`-escaped, URL-quoted (`%XX` either case, `+`
  for spaces), hex (either case), and base64 (standard and URL-safe alphabets, at each of
  the three byte alignments, so a secret in the middle of an encoded blob is found too);
- in JSON lines, every decoded string (keys too) after parsing: an object can spell the
  secret with any mix of escapes, which no pattern over the raw line catches; when a
  decoded string held a secret, the line is stored re-serialised from the masked object.

What it cannot catch (docs/reliability.md): any other transformation (rot13, reversed,
split across lines or across two JSON strings, compressed, encrypted, one character per
line, another encoding nesting one of the above); a secret shorter than `MIN_SECRET`; and
secrets Porthole never knew about (what an agent finds on its own in the sandbox).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
from typing import Any
from urllib.parse import quote, quote_plus

from django.conf import settings

REDACTED = "[redacted]"
MIN_SECRET = 8  # shorter values would mask ordinary words everywhere


def secrets() -> tuple[str, ...]:
    """Every value Porthole hands to a sandbox that a viewer must never see: the
    OpenComputer API key and the Anthropic key the embedded server passes to the agent."""
    values = (
        settings.OPENCOMPUTER_API_KEY,
        os.environ.get("ANTHROPIC_API_KEY", ""),
    )
    return tuple(v for v in values if v and len(v) >= MIN_SECRET)


def _b64_cores(raw: bytes) -> set[str]:
    """The base64 characters that depend only on `raw`, at each of the three alignments."""
    cores: set[str] = set()
    for shift in range(3):
        padded = b"\0" * shift + raw
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(padded).decode().rstrip("=")
            start = -(-8 * shift // 6)  # ceil: skip characters that mix in the padding
            end = (8 * len(padded)) // 6  # floor: skip characters that mix in what follows
            core = text[start:end]
            if len(core) >= MIN_SECRET:
                cores.add(core)
    return cores


def _forms(secret: str) -> set[str]:
    raw = secret.encode()
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        "".join(f"\\u{ord(c):04x}" for c in secret),
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        raw.hex(),
        *_b64_cores(raw),
    }


@functools.lru_cache(maxsize=8)
def _pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern for every form of every secret, longest first. Case-insensitive: hex and
    percent-escapes come in either case, and masking a differently-cased copy does no harm."""
    forms: set[str] = set()
    for value in values:
        forms |= _forms(value)
    if not forms:
        return None
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("|".join(re.escape(f) for f in ordered), re.IGNORECASE)


@functools.lru_cache(maxsize=8)
def _ascii_forms(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """Every form of every secret, lower-cased, when all are ASCII (else None)."""
    forms = {form.lower() for value in values for form in _forms(value)}
    if not all(form.isascii() for form in forms):
        return None
    return tuple(sorted(forms))


def _surely_clean(text: str, values: tuple[str, ...]) -> bool:
    """Whether `text` certainly holds no form of a secret, found cheaply: a few substring
    searches (C, linear) cost a fifth of the case-insensitive alternation, which every line
    of a flood went through on the bridge's read loop. Exact for ASCII text and ASCII forms
    (case-insensitive matching between ASCII characters is `lower()` on both); anything
    else goes to the pattern, where non-ASCII characters fold in ways `lower()` does not."""
    forms = _ascii_forms(values)
    if forms is None or not text.isascii():
        return False
    lowered = text.lower()
    return not any(form in lowered for form in forms)


def mask_text(text: str) -> str:
    """The text with every known form of every secret replaced (the same object if none)."""
    values = secrets()
    pattern = _pattern(values)
    if pattern is None or _surely_clean(text, values) or pattern.search(text) is None:
        return text
    return pattern.sub(REDACTED, text)


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            out.append(key)
            _strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {mask_text(k): _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def mask_line(raw: str, data: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """Mask one line as received and its parsed object alike.

    Returns the same objects when there was nothing to mask. A JSON line whose decoded
    strings held a secret comes back re-serialised from the masked object, so what is
    stored, rendered and exported all come from masked text.
    """
    values = secrets()
    pattern = _pattern(values)
    # With escapes, decoded strings may spell a secret that no form in the raw line shows.
    if pattern is None or ("\\" not in raw and _surely_clean(raw, values)):
        return raw, data
    if data is None:
        return mask_text(raw), None
    if "\\" not in raw:
        # No escapes: every decoded string is a slice of the raw line.
        masked = mask_text(raw)
        if masked is raw:
            return raw, data
        return masked, _parsed(masked)
    try:
        found: list[str] = []
        _strings(data, found)
        if pattern.search("\0".join(found)) is None:
            masked = mask_text(raw)
            return (raw, data) if masked is raw else (masked, _parsed(masked))
        clean = _masked(data)
        return json.dumps(clean, ensure_ascii=False), clean
    except RecursionError:
        return mask_text(raw), None


def _parsed(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
