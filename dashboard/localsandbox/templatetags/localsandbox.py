"""`{% sandbox_isolation as isolation %}`: how sandboxes are isolated, for the start page.

With no `OPENCOMPUTER_API_URL` in the environment, Porthole runs the embedded server (which
`manage.py serve` starts with this same environment and settings), so the same probe gives the
same answer the server gave in its log. With one, sandboxes are OpenComputer's microVMs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from django import template
from django.conf import settings

from dashboard.localsandbox import isolation

register = template.Library()


@dataclass(frozen=True)
class IsolationShown:
    mode: str  # "cloud", or an isolation.Mode
    detail: str

    @property
    def safe(self) -> bool:
        return self.mode in ("cloud", "bubblewrap")


@functools.cache
def _probe(bwrap: str, unsafe: bool) -> isolation.Status:
    return isolation.probe(bwrap, unsafe_no_isolation=unsafe)


@register.simple_tag
def sandbox_isolation() -> IsolationShown:
    if os.environ.get("OPENCOMPUTER_API_URL"):
        return IsolationShown("cloud", "OpenComputer cloud: each sandbox is a microVM of its own")
    status = _probe(settings.LOCALSANDBOX_BWRAP, settings.LOCALSANDBOX_UNSAFE_NO_ISOLATION)
    return IsolationShown(status.mode, status.detail)
