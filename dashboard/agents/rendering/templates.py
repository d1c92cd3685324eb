"""The timeline's templates (`templates/agents/timeline.jinja`), one macro per partial.

Jinja2 rather than Django's engine for this one file: it draws every event as it is
recorded, and Django's engine spent about 75 µs an event there (resolving each variable
through a chain of lookups and exceptions), most of the recording path's cost after the
database; the compiled macros take about 15. Autoescaping is on, and values
Django marked safe (`SafeString`, sanitised markdown and Pygments output) pass as they do
in Django's templates, through `__html__`. The escaping itself is MarkupSafe's, so quotes
come out as `&#34;`/`&#39;` where Django writes `&quot;`/`&#x27;` (the same to a browser);
doing it Django's way cost as much again as the rest of the render. Printed values are
strings and integers, which neither engine localizes.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from django.conf import settings
from django.template.defaultfilters import filesizeformat, pluralize
from django.urls import reverse
from django.utils.safestring import SafeString, mark_safe

TIMELINE = "agents/timeline.jinja"


def _url(name: str, *args: Any) -> str:
    return reverse(name, args=args)


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(settings.BASE_DIR / "templates"),
        autoescape=True,
        auto_reload=settings.DEBUG,
    )
    environment.globals["url"] = _url
    environment.filters["pluralize"] = pluralize
    environment.filters["filesizeformat"] = filesizeformat
    return environment


def _macros() -> Any:
    # Looked up each time (a dictionary lookup unless DEBUG reloads an edited file).
    return _environment().get_template(TIMELINE).module


def render(macro: str, **context: Any) -> SafeString:
    """The named macro of the timeline (`event`, `event_oob`, `seq_mark`…) called with
    `context`, as markup that Django's templates insert unescaped."""
    return mark_safe(str(getattr(_macros(), macro)(**context)))  # noqa: S308 - autoescaped
