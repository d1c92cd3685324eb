"""Pages for refusals and things not found, in the site's own layout: Django's bare ones left
a person (a share link's holder after a revoke, a viewer who followed a steering link) with
no way on. htmx requests get the message alone, for the element that asked."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

FORBIDDEN = "You do not have permission to do that. An administrator can give you a role that does."
NOT_FOUND = "There is nothing here, or nothing you may see."
SHARE_GONE = (
    "This share link no longer works: it was revoked or it expired. "
    "Ask whoever sent it for a new one."
)


def _page(request: HttpRequest, status: int, heading: str, message: str) -> HttpResponse:
    template = "errors.html#message" if getattr(request, "htmx", False) else "errors.html"
    context = {"heading": heading, "message": message, "status": status}
    return render(request, template, context, status=status)


def forbidden(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    # Porthole's own refusals say why (`access.require`); anything else gets the general line.
    said = str(exception) if exception is not None else ""
    return _page(request, 403, "Not allowed", said or FORBIDDEN)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    # Not the exception's text: Django's say which model and query did not match.
    shared = request.path_info.startswith("/share/")  # under any SCRIPT_NAME
    return _page(request, 404, "Not found", SHARE_GONE if shared else NOT_FOUND)
