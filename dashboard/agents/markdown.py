"""Markdown from a sandbox, made safe to put in a page.

Two layers, because the text is hostile (DESIGN §4.3): markdown-it renders with raw HTML
disabled (so any tag the model writes comes out escaped), then nh3 re-parses the result
and keeps only an explicit allow-list of tags, attributes and URL schemes. Either layer
alone should be enough; together a bug in one is not a hole.
"""

from __future__ import annotations

import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

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
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "noopener noreferrer nofollow"

_cleaner = nh3.Cleaner(
    tags=ALLOWED_TAGS,
    # markdown-it escapes raw HTML, so these can only come from a bug upstream: drop them
    # with their content rather than leave a script's text lying in the page.
    clean_content_tags={"script", "style", "iframe", "object", "embed", "svg", "math"},
    attributes=ALLOWED_ATTRIBUTES,
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


def _build() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
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
