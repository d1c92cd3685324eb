"""ASGI entry point: HTTP through Django, WebSockets through Channels.

WebSockets must come from this very site (scheme, host and port: `routing.same_origin`)
and carry a session cookie.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from dashboard.agents.routing import SocketUser, websocket_application  # noqa: E402
from dashboard.heap import freeze_startup_heap  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Static files come from WhiteNoise's middleware (settings.MIDDLEWARE): hashed,
        # compressed, cached for a year. It knows every file it serves up front, so a path
        # that climbs out (`/static/%2e%2e/...`) is simply not one of them: Django's 404.
        "http": django_asgi_app,
        "websocket": websocket_application(SocketUser),
    }
)

# Whatever imports the application (web workers, `manage.py serve`) is a long-lived
# process that has now loaded what it lives on: keep full collections from walking it.
freeze_startup_heap()
