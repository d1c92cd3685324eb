"""Syntax highlighting (issue 12): rendered once on the server by Pygments, classes only (the
CSP allows no inline style), for fenced code, Read/Write/Edit by file extension and Bash;
Edit and MultiEdit as a unified diff with line numbers; hostile input stays inert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dashboard.agents.markdown import TOKEN_CLASSES, render_markdown
from dashboard.agents.rendering import render_timeline
from dashboard.agents.rendering.highlight import diff, lexer_for_path, lexer_named
from tests.agents.test_rendering import XSS, add_event, assert_safe, make_session, parse

pytestmark = pytest.mark.django_db

STYLESHEET = Path(__file__).resolve().parents[2] / "static" / "porthole" / "highlight.css"


def classes(html: str) -> set[str]:
    return {c for e in parse(html).find("span") for c in e.attrs.get("class", "").split()}


def tool_call(name: str, tool_input: dict[str, Any], tool_id: str = "toolu_h") -> dict:
    block = {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}
    return {"type": "assistant", "message": {"content": [block]}}


def rendered(*payloads: dict) -> str:
    session = make_session()
    for payload in payloads:
        add_event(session, "agent", payload)
    events = list(session.events.order_by("seq"))
    return render_timeline(session, events).timeline


def test_it_highlights_a_fenced_snippet_with_token_classes() -> None:
    html = render_markdown('```python\ndef greet(name):\n    return f"hi {name}"\n```\n')
    found = classes(html)
    assert {"k", "nf"} <= found, found  # keyword `def`, function name `greet`
    assert found <= TOKEN_CLASSES
    assert "style=" not in html


def test_it_leaves_fences_without_a_known_language_plain() -> None:
    html = render_markdown("```\ndef x(): pass\n```\n\n```no-such-lang\ny\n```\n")
    assert not parse(html).find("span")


def test_it_highlights_bash_write_and_json_input() -> None:
    html = rendered(
        tool_call("Bash", {"command": "ls -la | grep '.py'"}, "toolu_b"),
        tool_call("Write", {"file_path": "/w/app.js", "content": "const x = 1;\n"}, "toolu_w"),
        tool_call("Grep", {"pattern": "x", "glob": "*.py", "n": 3}, "toolu_g"),
    )
    page = assert_safe(html)
    bash = page.find("pre", "code-bash")[0]
    assert "hl" in bash.classes
    assert {"kd", "s1"} & classes(html), "the JavaScript keyword `const` or the quoted string"
    assert page.find("pre", "code-write") and page.find("pre", "code-json")
    assert "style=" not in html


def test_it_highlights_read_output_by_extension_with_its_line_numbers() -> None:
    content = "     1\u2192import os\n     2\u2192print(os.name)"
    html = rendered(
        tool_call("Read", {"file_path": "/w/main.py"}, "toolu_r"),
        {
            "type": "user",
            "message": {
                "content": [{"type": "tool_result", "tool_use_id": "toolu_r", "content": content}]
            },
        },
    )
    page = assert_safe(html)
    table = page.find("table", "numbered")
    assert table
    numbers = [e for e in page.find("td") if "ln" in e.attrs.get("class", "")]
    assert len(numbers) == 2
    assert {"kn", "nn"} <= classes(html)  # `import os`
    shown = "".join(page.text)
    assert "import os" in shown and "\u2192" not in shown


def test_it_shows_an_edit_as_a_unified_diff_with_line_numbers_and_no_phantom_line() -> None:
    rows, cut = diff("a = 1\nb = 2\nc = 3\n", "a = 1\nb = 20\nc = 3\n", lexer_for_path("x.py"))
    assert not cut
    assert [(r.sign, r.old, r.new) for r in rows] == [
        ("@", None, None),
        (" ", 1, 1),
        ("-", 2, None),
        ("+", None, 2),
        (" ", 3, 3),
    ]
    assert rows[0].html == "@@ -1,3 +1,3 @@"
    # The trailing newline is no extra changed (or empty) line.
    rows, _ = diff("x\n", "y\n", None)
    assert [r.sign for r in rows] == ["@", "-", "+"]


def test_it_renders_edit_and_multiedit_diffs_in_the_card() -> None:
    html = rendered(
        tool_call(
            "MultiEdit",
            {
                "file_path": "/w/m.py",
                "edits": [
                    {"old_string": "x = 1\n", "new_string": "x = 2\n"},
                    {
                        "old_string": "def f():\n    pass\n",
                        "new_string": "def f():\n    return 1\n",
                    },
                ],
            },
        )
    )
    page = assert_safe(html)
    assert len(page.find("tr", "diff-hunk")) == 2
    assert len(page.find("tr", "diff-del")) == 2 and len(page.find("tr", "diff-add")) == 2
    assert len(page.find("tr", "diff-ctx")) == 1  # `def f():`
    assert {"k", "nf"} <= classes(html)


@pytest.mark.parametrize("payload", XSS)
def test_it_keeps_hostile_code_inert_everywhere_it_is_highlighted(payload: str) -> None:
    html = rendered(
        {
            "type": "assistant",
            "message": {"content": f"```html\n{payload}\n```\n```js\n{payload}\n```"},
        },
        tool_call("Bash", {"command": payload}, "toolu_1"),
        tool_call("Write", {"file_path": "/w/x.html", "content": payload}, "toolu_2"),
        tool_call(
            "Edit",
            {"file_path": "/w/x.js", "old_string": payload, "new_string": payload + "!"},
            "toolu_3",
        ),
    )
    assert_safe(html)


def test_it_highlights_within_the_event_budget() -> None:
    # Ten Write calls of 4,000 characters each: 80,000 units of highlighting wanted, the
    # event may spend 30,000; the rest is shown plain (escaped), never dropped silently.
    session = make_session()
    code = ("x = [1, 2, 3]  # comment\n" * 200)[:4000]
    content = [
        {
            "type": "tool_use",
            "id": f"toolu_{n}",
            "name": "Write",
            "input": {"file_path": f"/w/{n}.py", "content": code},
        }
        for n in range(10)
    ]
    event = add_event(session, "agent", {"type": "assistant", "message": {"content": content}})
    html = render_timeline(session, [event]).timeline
    page = assert_safe(html)
    pres = page.find("pre", "code-write")
    highlighted = [p for p in pres if "hl" in p.classes]
    assert 0 < len(highlighted) < len(pres)


def test_it_ships_a_stylesheet_for_every_token_class_light_and_dark() -> None:
    css = STYLESHEET.read_text()
    assert "prefers-color-scheme: dark" in css
    for token in ("k", "s2", "nf", "c1"):
        assert f".{token} " in css or f".{token}{{" in css, token


def test_it_finds_lexers_by_name_and_extension() -> None:
    assert lexer_named("py") is not None and lexer_named("nonsense-lang") is None
    assert lexer_for_path("/a/b/Makefile") is not None
    assert lexer_for_path("/a/b/c.rs") is not None and lexer_for_path("/a/b/c.zzz") is None
