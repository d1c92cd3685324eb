"""Typed errors for the OpenComputer API, and the redaction every message goes through.

The API answers errors as JSON ``{"error": "..."}``; :func:`error_from_response` turns a
status and a body into the matching :class:`OpenComputerError` subclass. Credentials travel
in headers (REST) and in the query string (WebSocket ``?api_key=`` / ``?token=``), so every
message and URL an error carries passes through :func:`redact` first.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import quote

__all__ = [
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "NotFound",
    "OpenComputerError",
    "PayloadTooLarge",
    "ProtocolError",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "error_from_response",
    "redact",
]

#: How much of a non-JSON error body a message keeps.
BODY_EXCERPT = 200

REDACTED = "[redacted]"

# `api_key=...` / `token=...` in a query string (or anywhere text quotes one). The value runs
# to the next `&`, `#`, whitespace or quote.
_SECRET_QUERY = re.compile(r"(?i)\b(api_key|apikey|token|access_token)=([^&#\s'\"<>]*)")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with credential query values and each of ``secrets`` (raw or URL-quoted) masked."""
    out = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    for secret in secrets:
        if not secret:
            continue
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            out = out.replace(form, REDACTED)
    return out


class OpenComputerError(Exception):
    """An OpenComputer call failed.

    ``status`` is the HTTP status (``None`` when no response arrived), ``message`` the
    server's ``error`` text (or a description), ``method``/``url`` the request (URL redacted).
    """

    status: int | None
    message: str
    method: str | None
    url: str | None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.message = redact(message)
        self.method = method
        self.url = redact(url) if url is not None else None
        super().__init__(self._describe())

    def _describe(self) -> str:
        head = f"HTTP {self.status}: " if self.status is not None else ""
        where = ""
        if self.url:
            where = f" ({self.method} {self.url})" if self.method else f" ({self.url})"
        return f"{head}{self.message}{where}"

    def __str__(self) -> str:
        return self._describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, message={self.message!r})"


class BadRequest(OpenComputerError):
    """400: the request was malformed or missing a required field."""


class Unauthorized(OpenComputerError):
    """401: the API key (or sandbox token) is missing or wrong."""


class Forbidden(OpenComputerError):
    """403: the credentials are valid but not allowed to do this."""


class NotFound(OpenComputerError):
    """404: no such sandbox or session (or the sandbox was killed)."""


class Conflict(OpenComputerError):
    """409: the resource is not in a state that allows this (e.g. the session already exited)."""


class PayloadTooLarge(OpenComputerError):
    """413: the request body is larger than the server accepts."""


class RateLimited(OpenComputerError):
    """429: too many requests. ``retry_after`` is the server's hint in seconds, if any."""

    retry_after: float | None = None


class ServerError(OpenComputerError):
    """5xx (including 503 while a sandbox or worker is unavailable)."""


class ConnectionFailed(OpenComputerError):
    """No usable response: connection refused or reset, DNS failure, TLS error or a timeout."""


class ProtocolError(OpenComputerError):
    """A successful response that does not have the shape the protocol promises."""


_BY_STATUS: dict[int, type[OpenComputerError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
}


def error_class(status: int) -> type[OpenComputerError]:
    """The error type for an HTTP status (unlisted 4xx map to the base class)."""
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, OpenComputerError)


def message_from_body(status: int, body: bytes | bytearray | str | None, reason: str = "") -> str:
    """The ``error`` text of a JSON error body, or ``status`` plus a truncated excerpt."""
    if isinstance(body, bytes | bytearray):
        text = body.decode("utf-8", errors="replace")
    else:
        text = body or ""
    try:
        parsed = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        for key in ("error", "message", "detail"):
            value = parsed.get(key)
            if isinstance(value, str) and value:
                return value
    excerpt = " ".join(text.split())
    if len(excerpt) > BODY_EXCERPT:
        excerpt = excerpt[:BODY_EXCERPT] + "…"
    if not excerpt and reason and reason != _standard_reason(status):
        return reason  # a server that puts its message in the reason phrase
    label = f"{status} {reason or _standard_reason(status)}".strip()
    return f"{label}: {excerpt}" if excerpt else label


def _standard_reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def error_from_response(
    status: int,
    body: bytes | bytearray | str | None,
    *,
    reason: str = "",
    method: str | None = None,
    url: str | None = None,
    retry_after: str | None = None,
    secrets: Iterable[str | None] = (),
) -> OpenComputerError:
    """Build the typed error for an error response (``secrets`` are masked out of the text)."""
    message = redact(message_from_body(status, body, reason), secrets)
    cls = error_class(status)
    error = cls(message, status=status, method=method, url=redact(url, secrets) if url else url)
    if isinstance(error, RateLimited) and retry_after:
        with contextlib.suppress(ValueError):
            error.retry_after = float(retry_after)
    return error
