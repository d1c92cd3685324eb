"""Hostile Markdown made inert, so that a file Porthole writes is safe in any renderer.

Inside code blocks (as CommonMark sees them) text stays as written: every renderer shows
it verbatim. Outside them `&` and `<` become entities (no tag, comment, autolink or entity
trick survives), a link whose target has a scheme other than http(s)/mailto loses its `(`,
every link reference definition the `]` that ends its label, every image its `!` (it becomes
a link: a renderer would otherwise fetch whatever the agent pointed at, a tracking pixel
with it), and a fence left open is closed.
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt

from dashboard.agents.rendering import clean_text, one_line

# Link schemes a renderer may turn into a working link or image.
SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
_LINK_TARGET = re.compile(r"\]\(([^)]{0,200})")
# The end of a link reference definition's label: a `]` that no backslash escapes, followed
# at once by `:`. Escaping that `]` unmakes every definition, wherever its `[` is (its label
# may span lines, and it may sit in a block quote or a list item).
_REFERENCE = re.compile(r"(?<!\\)((?:\\\\)*)\]:")
# An image's `!` that no backslash escapes.
_IMAGE = re.compile(r"(?<!\\)((?:\\\\)*)!\[")
_SCHEME = re.compile(r"([a-z][a-z0-9+.\-]*):")
_PARSER = MarkdownIt("commonmark")


def _unsafe_target(target: str) -> bool:
    # What a lenient renderer may read as the URL: no whitespace, no escapes, any case.
    probe = re.sub(r"[\s\\\x00-\x1f]", "", target).lower()
    scheme = _SCHEME.match(probe)
    return scheme is not None and scheme.group(1) not in SAFE_SCHEMES


def _inert(text: str) -> str:
    """Prose that no renderer turns into HTML or a dangerous link.

    `&` and `<` become entities: no tag, comment, autolink or entity trick survives (code
    spans too: an HTML tag takes precedence over a code span in CommonMark, so a span is no
    shelter). A link whose target has a scheme other than http(s)/mailto loses its `(`, and
    every link reference definition the `]` that ends its label, so neither is a link any
    more; an image is escaped into a link to it.
    """
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    text = _LINK_TARGET.sub(
        lambda m: "]\\(" + m.group(1) if _unsafe_target(m.group(1)) else m.group(0), text
    )
    text = _IMAGE.sub(r"\1\\![", text)
    return _REFERENCE.sub(r"\1\\]:", text)


def _closes(line: str, markup: str) -> bool:
    closing = rf" {{0,3}}{re.escape(markup[0])}{{{len(markup)},}}[ \t]*"
    return re.fullmatch(closing, line) is not None


def safe_markdown(text: str) -> str:
    """Hostile markdown made inert outside its code blocks, and unable to leave one open.

    CommonMark itself (markdown-it) says which lines are code: inside fenced and indented
    code blocks the text stays as written, since every renderer shows it verbatim; every
    other line goes through `_inert`. A fence left open at the end is closed here, or it
    would swallow, and then unfence, whatever follows it in the transcript.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    verbatim = [False] * len(lines)
    close = ""
    for token in _PARSER.parse(text):
        if token.type not in ("fence", "code_block") or token.map is None:
            continue
        start, end = token.map
        if token.type == "fence":
            start += 1  # the opening line (and its info string) is markup, not code
            if end - 1 > start - 1 and _closes(lines[end - 1], token.markup):
                end -= 1
            elif token.level == 0 and end >= len(lines):
                close = token.markup
        for index in range(start, min(end, len(lines))):
            verbatim[index] = True
    out: list[str] = []
    prose: list[str] = []
    for line, keep in zip(lines, verbatim, strict=True):
        if keep:
            if prose:
                out.append(_inert("\n".join(prose)))
                prose = []
            out.append(line)
        else:
            prose.append(line)
    if prose:
        out.append(_inert("\n".join(prose)))
    if close:
        out.append(close)
    return "\n".join(out)


def plain(text: str, limit: int = 200) -> str:
    """One line of hostile text (a title, a name, a message), inert in any renderer."""
    return _inert(one_line(clean_text(text), limit))
