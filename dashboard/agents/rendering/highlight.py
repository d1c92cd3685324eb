"""Syntax highlighting, rendered once on the server with Pygments.

Pygments' `HtmlFormatter` escapes every character of the source and marks tokens with short
class names only (`k`, `s2`, `nf`…): no inline styles, so the CSP needs nothing, and the
colours live in `static/porthole/highlight.css` (light and dark). Its output is the only
HTML besides sanitised markdown that the timeline marks safe.

Highlighting costs about two microseconds a character: it draws on the event's work budget
(`budget`), and code past it is shown plain.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from pygments import highlight as pygments_highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

from dashboard.agents.rendering import budget

# Work units per highlighted character (a unit is about 2 µs; see `markdown.work`).
WEIGHT = 2
# Lines compared per edit: difflib's matcher is quadratic in the worst case.
MAX_DIFF_LINES = 400
# Every class Pygments may write: what the markdown sanitiser lets through on <span>.
TOKEN_CLASSES = frozenset(css for css in STANDARD_TYPES.values() if css)

_formatter = HtmlFormatter(nowrap=True)


@lru_cache(maxsize=256)
def lexer_named(name: str) -> Lexer | None:
    """The lexer for a fence's language or an alias ("py", "sh"…); None when unknown."""
    try:
        # No newline added at the end: it would show as an extra empty line.
        return get_lexer_by_name(name.strip().lower()[:40], ensurenl=False, stripnl=False)
    except (ClassNotFound, ValueError):
        return None


@lru_cache(maxsize=256)
def _lexer_for_name(file_name: str) -> Lexer | None:
    try:
        return get_lexer_for_filename(file_name, ensurenl=False, stripnl=False)
    except (ClassNotFound, ValueError):
        return None


def lexer_for_path(path: str) -> Lexer | None:
    """By file name: looking one up scans every lexer's patterns (milliseconds), so the
    answer is cached per extension (or per name, for `Makefile` and friends)."""
    name = PurePosixPath(path[-200:]).name
    suffix = PurePosixPath(name).suffix
    return _lexer_for_name(f"x{suffix}" if suffix else name)


def lines(text: str, lexer: Lexer | None) -> list[SafeString] | None:
    """`text` as highlighted lines (each one well-formed HTML: Pygments closes its spans at
    every line end), or None when there is no lexer or no budget for it."""
    if lexer is None or not text or not budget.current().spend(WEIGHT * len(text)):
        return None
    html = pygments_highlight(text, lexer, _formatter)
    if html.endswith("\n") and not text.endswith("\n"):
        html = html[:-1]
    return [mark_safe(line) for line in html.split("\n")]  # noqa: S308 - escaped by Pygments


def block(text: str, lexer: Lexer | None) -> SafeString | None:
    """`text` highlighted as one block, or None (see `lines`)."""
    found = lines(text, lexer)
    return mark_safe("\n".join(found)) if found is not None else None  # noqa: S308


def for_markdown(code: str, lang: str, attrs: object) -> str:
    """markdown-it's `highlight` hook for fenced code: "" leaves the fence to markdown-it's
    own escaping; the result then goes through the sanitiser like all markdown."""
    lexer = lexer_named(lang.split()[0]) if lang.strip() else None
    return block(code, lexer) or ""


# -- Edit and MultiEdit as a unified diff -------------------------------------------------


@dataclass(frozen=True)
class DiffRow:
    sign: str  # " " context, "-" removed, "+" added, "@" hunk header
    old: int | None  # line number in the old text (1-based, within the edit)
    new: int | None
    html: SafeString  # the line, highlighted or escaped

    @property
    def css(self) -> str:
        return {"-": "del", "+": "add", "@": "hunk"}.get(self.sign, "ctx")


def _split(text: str) -> list[str]:
    # splitlines() without ends: a trailing newline is no extra (empty) line.
    return text.splitlines()[:MAX_DIFF_LINES]


def _shown(text: str, lexer: Lexer | None) -> list[SafeString]:
    highlighted = lines("\n".join(_split(text)), lexer)
    if highlighted is not None and len(highlighted) == len(_split(text)):
        return highlighted
    return [escape(line) for line in _split(text)]


def diff(old: str, new: str, lexer: Lexer | None) -> tuple[list[DiffRow], bool]:
    """One edit as rows of a unified diff (all context kept: an edit is small), with the
    line numbers within the edit; whether lines were left out."""
    old_lines, new_lines = _split(old), _split(new)
    old_html, new_html = _shown(old, lexer), _shown(new, lexer)
    cut = len(old.splitlines()) > MAX_DIFF_LINES or len(new.splitlines()) > MAX_DIFF_LINES
    header = f"@@ -1,{len(old_lines)} +1,{len(new_lines)} @@"
    rows = [DiffRow("@", None, None, escape(header))]
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            rows += [
                DiffRow(" ", i + 1, j + 1, old_html[i])
                for i, j in zip(range(i1, i2), range(j1, j2), strict=True)
            ]
            continue
        rows += [DiffRow("-", i + 1, None, old_html[i]) for i in range(i1, i2)]
        rows += [DiffRow("+", None, j + 1, new_html[j]) for j in range(j1, j2)]
    return rows, cut
