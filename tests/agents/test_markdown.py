"""Markdown from a sandbox: rendered, then sanitised against an allow-list."""

from __future__ import annotations

import pytest
from django.utils.safestring import SafeString

from dashboard.agents.markdown import MAX_INPUT_CHARS, TOKEN_CLASSES, render_markdown
from tests.agents.test_rendering import XSS, assert_safe, parse


def test_it_renders_commonmark_tables_and_strikethrough() -> None:
    html = render_markdown(
        "# Title\n\nSome **bold**, *em*, `code` and ~~gone~~.\n\n"
        "> quoted\n\n1. one\n2. two\n\n- a\n- b\n\n---\n\n"
        "```python\nprint('x')\n```\n\n| a | b |\n|--:|---|\n| 1 | 2 |\n"
    )
    assert isinstance(html, SafeString)
    tags = {e.tag for e in parse(html).elements}
    assert {
        "h1",
        "strong",
        "em",
        "code",
        "s",
        "blockquote",
        "ol",
        "ul",
        "li",
        "hr",
        "pre",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
    } <= tags
    assert "print('x')" in "".join(parse(html).text)


def test_it_drops_classes_and_styles_from_the_renderer() -> None:
    html = render_markdown("```python\nx\n```\n\n| a |\n|--:|\n| 1 |\n")
    for element in parse(html).elements:
        assert "style" not in element.attrs, element
        # Only highlighted code keeps classes: Pygments' token classes, on <span>.
        if element.tag != "span":
            assert "class" not in element.attrs, element
        else:
            assert set(element.attrs["class"].split()) <= TOKEN_CLASSES, element


def test_it_keeps_only_token_classes_written_by_hand() -> None:
    html = render_markdown('<span class="k evil">x</span> `y`')
    assert not parse(html).find("span"), "raw HTML stays text"
    assert "&lt;span" in html


def test_it_escapes_raw_html() -> None:
    html = render_markdown("<b>bold?</b> <div onclick=x>d</div>")
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html
    assert "<b>" not in html and "<div" not in html


@pytest.mark.parametrize(
    ("source", "href"),
    [
        ("[a](https://example.com/x?y=1)", "https://example.com/x?y=1"),
        ("[a](http://example.com)", "http://example.com"),
        ("[a](mailto:someone@example.com)", "mailto:someone@example.com"),
        ("<https://example.com/auto>", "https://example.com/auto"),
    ],
)
def test_it_keeps_http_and_mailto_links_with_rel(source: str, href: str) -> None:
    links = parse(render_markdown(source)).find("a")
    assert len(links) == 1
    assert links[0].attrs["href"] == href
    assert set(links[0].attrs["rel"].split()) == {"noopener", "noreferrer", "nofollow"}
    assert "target" not in links[0].attrs


@pytest.mark.parametrize(
    "source",
    [
        "[a](javascript:alert(1))",
        "[a](JaVaScRiPt:alert(1))",
        "[a](jav&#x09;ascript:alert(1))",
        "[a](&#x6A;avascript:alert(1))",
        "[a](vbscript:msgbox(1))",
        "[a](data:text/html;base64,PHNjcmlwdD4=)",
        "[a](file:///etc/passwd)",
        "[a](ftp://example.com/x)",
        "[a](//evil.example/x)",
        "[a](/admin/)",
        "[a](src/app.py)",
        "[a](#event-1)",
    ],
)
def test_it_drops_every_other_scheme_and_relative_links(source: str) -> None:
    html = render_markdown(source)
    for link in parse(html).find("a"):
        assert "href" not in link.attrs, html
    assert "javascript:alert" not in html.replace("[a](javascript:alert", "")


def test_it_turns_images_into_links() -> None:
    html = render_markdown('![a chart](https://example.com/c.png "t") ![x](javascript:alert(1))')
    page = parse(html)
    assert not page.find("img")
    links = page.find("a")
    assert links[0].attrs["href"] == "https://example.com/c.png"
    assert "[image: a chart]" in html


@pytest.mark.parametrize("payload", XSS)
def test_it_neutralises_xss_payloads(payload: str) -> None:
    for text in (
        payload,
        f"text {payload} more",
        f"- {payload}",
        f"> {payload}",
        f"| {payload} |\n|---|\n| {payload} |",
        f"[{payload}]({payload})",
    ):
        assert_safe(f'<div class="md">{render_markdown(text)}</div>')


def test_it_caps_input_before_parsing() -> None:
    html = render_markdown("a" * (MAX_INPUT_CHARS + 5000) + " TAIL")
    assert "TAIL" not in html
    assert html.count("a") >= MAX_INPUT_CHARS


def test_it_copes_with_pathological_nesting_quickly() -> None:
    html = render_markdown("> " * 5000 + "deep\n" + "[" * 20000 + "*" * 20000)
    assert_safe(html)


def test_it_returns_empty_for_empty_or_non_text() -> None:
    assert render_markdown("") == ""
    assert render_markdown(None) == ""  # type: ignore[arg-type]
