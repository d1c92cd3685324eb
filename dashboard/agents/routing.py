"""The WebSocket side: its routes, and the origin check every socket passes first."""

from __future__ import annotations

from importlib import import_module
from typing import Any, cast
from urllib.parse import urlsplit

from channels.auth import get_user
from channels.routing import URLRouter
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.cookie import parse_cookie
from django.http.request import split_domain_port, validate_host
from django.urls import path, re_path
from django.utils.http import is_same_domain

from dashboard import proxies
from dashboard.agents import consumers

# Channels routes ASGI applications with Django's path(); the stubs expect views there.
websocket_urlpatterns: list[Any] = [
    path("ws/sessions/", cast(Any, consumers.SessionListConsumer.as_asgi())),
    path("ws/sessions/<uuid:session_id>/", cast(Any, consumers.SessionConsumer.as_asgi())),
    path("ws/share/<str:token>/", cast(Any, consumers.ShareSessionConsumer.as_asgi())),
    # Anything else is refused cleanly (URLRouter would raise, closing with 1011).
    re_path(r"", cast(Any, WebsocketDenier.as_asgi())),
]

Origin = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> Origin | None:
    """(scheme, host, port) of an http(s) origin, the port made explicit; None if invalid."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {
        name.decode("latin1").lower(): value.decode("latin1") for name, value in scope["headers"]
    }


def _scheme(scope: dict[str, Any], headers: dict[str, str]) -> str:
    """The page's scheme, as Django's `request.is_secure()` would see it for this socket: the
    proxy's header counts only from a trusted proxy, the rule HTTP follows (`proxies`)."""
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    client = scope.get("client") or ("", 0)
    if proxy and proxies.is_in(str(client[0]), proxies.trusted_proxies()):
        name, secure_value = proxy
        name = name.removeprefix("HTTP_").replace("_", "-").lower()
        if name in headers:
            return "https" if headers[name].split(",")[0].strip() == secure_value else "http"
    return "https" if scope.get("scheme") == "wss" else "http"


def same_origin(scope: dict[str, Any]) -> bool:
    """Whether a socket comes from a page of this very site: the Origin's scheme, host and port
    are the request's own (an allowed Host), or one of CSRF_TRUSTED_ORIGINS, which is the rule
    Django's CSRF check applies to POSTs. Another port is another origin: any other server on
    the machine (`http://localhost:9999`) is a stranger."""
    headers = _headers(scope)
    host = headers.get("host", "")
    domain, _ = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS or (
        ["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else []
    )
    if not domain or not validate_host(domain, allowed):
        return False
    origin = _origin(headers.get("origin", ""))
    if origin is None:
        return False
    if origin == _origin(f"{_scheme(scope, headers)}://{host}"):
        return True
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        scheme, _, netloc = trusted.partition("://")
        if netloc.startswith("*"):
            netloc_of_origin = urlsplit(headers["origin"]).netloc.lower()
            if scheme.lower() == origin[0] and is_same_domain(netloc_of_origin, netloc[1:]):
                return True
        elif origin == _origin(trusted):
            return True
    return False


class SameOriginValidator:
    """Refuses a socket that does not come from this site (`same_origin`)."""

    def __init__(self, application: Any) -> None:
        self.application = application
        self.denier: Any = WebsocketDenier.as_asgi()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not same_origin(scope):
            return await self.denier(scope, receive, send)
        return await self.application(scope, receive, send)


class SocketUser:
    """Who opens a socket (`scope["user"]`), from the session cookie, read once as it opens.

    What Channels' `AuthMiddlewareStack` does, without its three wrappers per connection,
    one of them around every message the socket sends (there to save a changed session with
    an HTTP response; a socket never saves one). Per idle viewer that is ~3 KiB less (the
    wrappers' objects, tracemalloc in bench/fanout.py), and per live frame one wrapper call
    and the lazy session it reads less.
    """

    def __init__(self, application: Any) -> None:
        self.application = application
        self.store = import_module(settings.SESSION_ENGINE).SessionStore

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        cookies = parse_cookie(_headers(scope).get("cookie", ""))
        session = self.store(cookies.get(settings.SESSION_COOKIE_NAME))
        scope = {**scope, "cookies": cookies, "session": session}
        scope["user"] = await get_user(cast(Any, scope))  # the stubs want a TypedDict
        return await self.application(scope, receive, send)


def websocket_application(application: Any = None) -> Any:
    """The routes behind the origin check; `application` wraps the router (authentication)."""
    router = URLRouter(websocket_urlpatterns)
    return SameOriginValidator(application(router) if application else router)
