"""Search through everything every session said and ran (team members only)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from dashboard.agents.access import viewer_required
from dashboard.search.index import search as run_search
from dashboard.search.index import terms

RESULTS = 50


@require_GET
@viewer_required
def search(request: HttpRequest) -> HttpResponse:
    query = request.GET.get("q", "").strip()[:200]
    hits = run_search(query, RESULTS) if query else []
    context = {"query": query, "hits": hits, "searched": bool(terms(query))}
    is_htmx = getattr(request, "htmx", False)
    template = "search/search.html#results" if is_htmx else "search/search.html"
    return render(request, template, context)
