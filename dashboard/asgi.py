"""ASGI entry point: HTTP through Django, WebSockets through Channels.

WebSockets must come from this very site (scheme, host and port: `routing.same_origin`)
and carry a session cookie.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.settings")
django_asgi_app = get_asgi_application()

from typing import Any  # noqa: E402

from asgiref.sync import sync_to_async  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.exceptions import SuspiciousOperation  # noqa: E402
from django.core.handlers.exception import response_for_exception  # noqa: E402

from dashboard.agents.routing import websocket_application  # noqa: E402


class StaticFiles(ASGIStaticFilesHandler):
    """Porthole serves its own (small, fingerprint-free) static files: no extra server.

    A path that climbs out of the static directories (`/static/%2e%2e/...`) is a 400, as
    any other suspicious request is, not an unhandled error.
    """

    async def get_response_async(self, request: Any) -> Any:
        try:
            return await super().get_response_async(request)
        except SuspiciousOperation as exc:
            return await sync_to_async(response_for_exception)(request, exc)


application = ProtocolTypeRouter(
    {
        "http": StaticFiles(django_asgi_app),
        "websocket": websocket_application(AuthMiddlewareStack),
    }
)
