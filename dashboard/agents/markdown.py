"""Markdown from a sandbox, made safe to put in a page.

Two layers, because the text is hostile (DESIGN §4.3): markdown-it renders with raw HTML
disabled (so any tag the model writes comes out escaped), then nh3 re-parses the result
and keeps only an explicit allow-list of tags, attributes and URL schemes. Either layer
alone should be enough; together a bug in one is not a hole.
"""

from __future__ import annotations

import re

import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from pygments.token import STANDARD_TYPES

# Longer input is cut before parsing: markdown parsers have super-linear corners, and
# nobody reads 100k characters in a timeline card anyway (the raw payload stays downloadable).
MAX_INPUT_CHARS = 100_000

ALLOWED_TAGS = {
    "p",
    "br",
    "strong",
    "em",
    "del",
    "s",
    "code",
    "pre",
    "blockquote",
    "ul",
    "ol",
    "li",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "a",
    "span",  # highlighted code: Pygments' token classes only (below)
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
# Every class Pygments' HtmlFormatter writes (short names: k, s2, nf…).
TOKEN_CLASSES = {css for css in STANDARD_TYPES.values() if css}
URL_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "noopener noreferrer nofollow"

# What makes markdown-it work hard: every `[` starts a link-label scan, every `*`/`_` a
# delimiter run, every `<` an autolink attempt… Measured on markdown-it-py 3: plain words cost
# well under a microsecond a character, a run of `[` about 20 µs, `![` about 35 µs.
SPECIALS = "[]!*_`<>&\\"
SPECIAL_WEIGHT = 10
_FENCE_OPEN = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")
_FENCE_CLOSE = re.compile(r" {0,3}(`{3,}|~{3,})[ \t]*")


def work(text: str) -> int:
    """What rendering `text` costs, in units of about two microseconds: its length, plus
    SPECIAL_WEIGHT for every character that starts inline parsing outside fenced code (code
    in a fence is taken as it is). Linear, and deliberately pessimistic where unsure (a
    fence inside a list or quote is counted as prose)."""
    cost = len(text)
    fence = ""
    for line in text.split("\n"):
        if fence:
            close = _FENCE_CLOSE.fullmatch(line)
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                fence = ""
            continue
        opening = _FENCE_OPEN.match(line)
        # An info string of a backtick fence cannot hold a backtick (then it is inline code).
        if opening and not (opening.group(1)[0] == "`" and "`" in opening.group(2)):
            fence = opening.group(1)
            continue
        cost += SPECIAL_WEIGHT * sum(line.count(char) for char in SPECIALS)
    return cost


_cleaner = nh3.Cleaner(
    tags=ALLOWED_TAGS,
    # markdown-it escapes raw HTML, so these can only come from a bug upstream: drop them
    # with their content rather than leave a script's text lying in the page.
    clean_content_tags={"script", "style", "iframe", "object", "embed", "svg", "math"},
    attributes=ALLOWED_ATTRIBUTES,
    allowed_classes={"span": TOKEN_CLASSES},
    url_schemes=URL_SCHEMES,
    # Relative links in agent output name files in the sandbox ("src/app.py"); resolved
    # against Porthole they would point into the dashboard itself. Keep the text, drop the link.
    url_relative="deny",
    link_rel=LINK_REL,
    strip_comments=True,
)


def _images_to_links(state: StateCore) -> None:
    """Turn `![alt](src)` into a plain link: no foreign images in the page (CSP blocks them
    anyway), but the reader still sees that there was one and where it pointed."""
    for block in state.tokens:
        if block.type != "inline" or not block.children:
            continue
        children: list[Token] = []
        for token in block.children:
            if token.type != "image":
                children.append(token)
                continue
            alt = token.content or "image"
            children += [
                Token("link_open", "a", 1, attrs={"href": str(token.attrGet("src") or "")}),
                Token("text", "", 0, content=f"[image: {alt}]"),
                Token("link_close", "a", -1),
            ]
        block.children = children


def _highlight(code: str, lang: str, attrs: object) -> str:
    """Fenced code with a language, highlighted by Pygments (classes only; the sanitiser
    keeps Pygments' token classes on <span> and nothing else)."""
    # Imported here: the rendering package imports this module.
    from dashboard.agents.rendering.highlight import for_markdown

    return for_markdown(code, lang, attrs)


def _build() -> MarkdownIt:
    md = MarkdownIt(
        "commonmark",
        {"html": False, "linkify": False, "typographer": False, "highlight": _highlight},
    )
    md.enable(["table", "strikethrough"])
    md.core.ruler.push("images_to_links", _images_to_links)
    return md


_md = _build()


def render_markdown(text: str) -> SafeString:
    """Sanitised HTML for untrusted markdown; the only thing in the timeline marked safe."""
    if not isinstance(text, str) or not text:
        return mark_safe("")
    html = _md.render(text[:MAX_INPUT_CHARS])
    return mark_safe(_cleaner.clean(html))  # noqa: S308 - this is the sanitiser's output
