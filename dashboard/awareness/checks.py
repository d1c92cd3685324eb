"""Start-up checks: a malformed PORTHOLE_WEBHOOK_URLS stops `manage.py` commands at once."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from dashboard.awareness.webhooks import check_url


@checks.register()
def webhook_urls(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for url in settings.PORTHOLE_WEBHOOK_URLS:
        try:
            check_url(url)
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(str(exc), id="awareness.E001"))
    return errors
