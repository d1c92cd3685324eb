"""The little HTTP toolkit the API needs on plain ASGI: requests, JSON responses, routing."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from .errors import ApiError, bad_request

Scope = dict[str, Any]
# Deeper bodies are refused: nothing in the API nests this far, and every later step that
# walks or re-encodes a value (the agent's stdin line) must not meet Python's recursion limit.
MAX_JSON_DEPTH = 64
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def header_map(scope: Scope) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", [])
    }


def query_map(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return {key: values[-1] for key, values in parse_qs(raw).items()}


@dataclass
class Request:
    method: str
    path: str  # relative to the API base, e.g. /sandboxes/sb-1
    headers: dict[str, str]
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    api_base: str = ""  # e.g. http://127.0.0.1:8787/api, as the client addressed us

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; an empty body is an empty object."""
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            value = None  # nested beyond the parser: refused just below
        if value is None or not within_depth(value, MAX_JSON_DEPTH):
            raise bad_request(f"request body is nested more than {MAX_JSON_DEPTH} levels deep")
        if not isinstance(value, dict):
            raise bad_request("request body must be a JSON object")
        return value


def within_depth(value: Any, limit: int) -> bool:
    """Whether `value` nests at most `limit` containers deep (walked without recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        pending.extend((child, depth + 1) for child in children)
    return True


@dataclass
class Response:
    status: int
    payload: Any = None  # None sends no body
    headers: dict[str, str] = field(default_factory=dict)


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed `limit` bytes."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body exceeds {limit} bytes")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes")
        if not message.get("more_body", False):
            break
    return bytes(body)


async def send_response(send: Send, response: Response) -> None:
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers.items()
    ]
    body = b""
    if response.payload is not None:
        body = json.dumps(response.payload).encode()
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(error: ApiError) -> Response:
    return Response(error.status, {"error": error.message}, dict(error.headers))


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """Paths like `/sandboxes/{sandbox_id}/exec`; 404 for unknown paths, 405 for wrong methods."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, template: str, handler: Handler) -> None:
        pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$")
        for existing, handlers in self._routes:
            if existing.pattern == pattern.pattern:
                handlers[method] = handler
                return
        self._routes.append((pattern, {method: handler}))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for pattern, handlers in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            handler = handlers.get(method)
            if handler is None:
                allowed = ", ".join(sorted(handlers))
                raise ApiError(405, f"method {method} not allowed on {path}", {"Allow": allowed})
            return handler, match.groupdict()
        raise ApiError(404, f"no such endpoint: {path}")
