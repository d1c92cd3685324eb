"""The OpenComputer client this process talks through, built from settings.

One `httpx.AsyncClient` per event loop: a web worker runs a single loop, so in production this is
one shared client; the Django test client runs each async view in a fresh loop, so each
gets its own (a client is bound to the loop that first used it).
"""

from __future__ import annotations

import asyncio
import weakref

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from dashboard.opencomputer import OpenComputer, OpenComputerError, redact

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, OpenComputer] = (
    weakref.WeakKeyDictionary()
)


def api_url() -> str:
    if not settings.OPENCOMPUTER_API_URL:
        raise ImproperlyConfigured(
            "OPENCOMPUTER_API_URL is not set: run Porthole with `manage.py serve`, which starts "
            "the embedded sandbox server, or point it at OpenComputer."
        )
    return settings.OPENCOMPUTER_API_URL


def client() -> OpenComputer:
    loop = asyncio.get_running_loop()
    existing = _clients.get(loop)
    if existing is not None and existing.api_url == _normalised(api_url()):
        return existing
    fresh = OpenComputer(api_url(), settings.OPENCOMPUTER_API_KEY)
    _clients[loop] = fresh
    return fresh


def _normalised(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/api") else f"{url}/api"


def secrets() -> tuple[str, ...]:
    """Values that must never reach a browser, for redacting messages shown to users."""
    return tuple(s for s in (settings.OPENCOMPUTER_API_KEY,) if s)


def shown(exc: OpenComputerError) -> str:
    """An upstream error as a person may see it: the server's message, secrets masked."""
    return redact(exc.message or str(exc), secrets())
