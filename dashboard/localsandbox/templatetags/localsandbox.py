"""`{% sandbox_isolation as isolation %}`: how sandboxes are isolated, for the start page.

The sandbox server Porthole talks to (`OPENCOMPUTER_API_URL`, which `manage.py serve` sets to
the embedded server it starts) says so itself: the embedded server answers
`GET /api/localsandbox` with its isolation mode, which OpenComputer's cloud does not have (404:
each sandbox a microVM). Probing bubblewrap here would describe this process's machine and
settings, not the server's. Asked with a short timeout and remembered briefly; when the server
does not answer, the page says the mode is unknown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from django import template
from django.conf import settings

register = template.Library()

TIMEOUT_S = 2.0
REMEMBER_S = 30.0
REMEMBER_UNKNOWN_S = 5.0
MODES = ("bubblewrap", "unsafe-none", "unavailable")


@dataclass(frozen=True)
class IsolationShown:
    mode: str  # "cloud", "unknown", or an isolation.Mode
    detail: str

    @property
    def safe(self) -> bool:
        return self.mode in ("cloud", "bubblewrap")


_answers: dict[str, tuple[float, IsolationShown]] = {}


def forget() -> None:
    """Drop remembered answers (tests, or after pointing Porthole at another server)."""
    _answers.clear()


def ask(api_url: str, api_key: str) -> IsolationShown:
    base = api_url.rstrip("/")
    base = base if base.endswith("/api") else f"{base}/api"
    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        response = httpx.get(f"{base}/localsandbox", headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        said = type(exc).__name__
        return IsolationShown("unknown", f"the sandbox server did not answer ({said})")
    if response.status_code == 404:
        return IsolationShown("cloud", "OpenComputer cloud: each sandbox is a microVM of its own")
    mode: object = None
    detail: object = None
    try:
        if response.status_code == 200:
            reported = response.json()["isolation"]
            mode, detail = reported["mode"], reported["detail"]
    except (ValueError, KeyError, TypeError):
        pass
    if mode not in MODES or not isinstance(detail, str):
        return IsolationShown(
            "unknown", f"the sandbox server answered {response.status_code} without a mode"
        )
    return IsolationShown(mode, detail)


@register.simple_tag
def sandbox_isolation() -> IsolationShown:
    api_url = settings.OPENCOMPUTER_API_URL
    if not api_url:
        return IsolationShown("unknown", "no sandbox server is configured (OPENCOMPUTER_API_URL)")
    now = time.monotonic()
    remembered = _answers.get(api_url)
    if remembered is not None and remembered[0] > now:
        return remembered[1]
    shown = ask(api_url, settings.OPENCOMPUTER_API_KEY or "")
    keep = REMEMBER_UNKNOWN_S if shown.mode == "unknown" else REMEMBER_S
    _answers[api_url] = (now + keep, shown)
    return shown
