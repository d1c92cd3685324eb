"""Usage (viewers), webhook settings (administrators) and the attention feed (viewers).

Share-link holders are not signed in and see none of it."""

from __future__ import annotations

import csv
import uuid
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from dashboard.agents import access
from dashboard.agents.access import viewer_required
from dashboard.agents.models import AgentSession
from dashboard.awareness import attention, usage
from dashboard.awareness.models import Delivery, Hook, Kind, new_secret

DELIVERY_LOG = 30
WATCH_LIMIT = 50
FEED_HORIZON_DAYS = 7


def can_manage_hooks(user: Any) -> bool:
    """Administrators: the people who may manage people may manage where events go."""
    return access.can_manage_people(user)


# -- usage ----------------------------------------------------------------------------------------


@require_GET
@viewer_required
def usage_page(request: HttpRequest) -> HttpResponse:
    period = usage.period_from(request.GET)
    report = usage.usage(period)
    context = {
        "period": period,
        "report": report,
        "charts": usage.charts(report),
        "periods": [(key, label) for key, (label, _) in usage.PERIODS.items()],
        "csv_query": period.query(),
    }
    return render(request, "awareness/usage.html", context)


def _csv_cell(value: object) -> object:
    """Spreadsheets run cells that start like a formula; model names come from sandboxes."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


@require_GET
@viewer_required
def usage_csv(request: HttpRequest) -> HttpResponse:
    period = usage.period_from(request.GET)
    report = usage.usage(period)
    filename = f"porthole-usage-{period.start}-{period.end}.csv"
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    writer = csv.writer(response)
    writer.writerow(
        ["day", "person", "model", "sessions", "turns", "input_tokens", "output_tokens", "cost_usd"]
    )
    for day, person, model, totals in report.rows:
        writer.writerow(
            [
                day.isoformat(),
                _csv_cell(person),
                _csv_cell(model),
                totals.sessions,
                totals.turns,
                totals.input_tokens,
                totals.output_tokens,
                str(totals.cost),
            ]
        )
    return response


# -- webhook settings -----------------------------------------------------------------------------


class HookForm(forms.ModelForm):  # type: ignore[type-arg]
    kinds = forms.MultipleChoiceField(
        choices=Kind.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every kind.",
    )

    class Meta:
        model = Hook
        fields = ["url", "description", "kinds"]
        labels = {"url": "Payload URL"}
        help_texts = {"url": "https://… — a Slack incoming-webhook URL works as is."}

    def clean_url(self) -> str:
        url = str(self.cleaned_data["url"])
        if not url.lower().startswith(("http://", "https://")):
            raise forms.ValidationError("Use an http:// or https:// URL.")
        return url


def _require_hooks(user: Any) -> None:
    if not can_manage_hooks(user):
        raise PermissionDenied("Only administrators manage webhooks.")


def _hooks_context(form: HookForm, **extra: Any) -> dict[str, Any]:
    deliveries = Delivery.objects.select_related("hook", "session").order_by("-created_at")
    kind = extra.get("log_kind", "")
    if kind in Kind.values:
        deliveries = deliveries.filter(kind=kind)
    return {
        "form": form,
        "hooks": Hook.objects.order_by("-active", "created_at"),
        "deliveries": deliveries[:DELIVERY_LOG],
        "kinds": Kind.choices,
        **extra,
    }


@require_http_methods(["GET", "POST"])
@viewer_required
def hooks(request: HttpRequest) -> HttpResponse:
    _require_hooks(request.user)
    if request.method == "POST":
        form = HookForm(request.POST)
        if form.is_valid():
            hook = form.save(commit=False)
            hook.created_by = request.user
            hook.save()
            access.audit(request.user, "webhook.add", hook.url[:200], hook=hook.pk)
            # The only time the secret is shown: the receiver needs it to check signatures.
            context = _hooks_context(HookForm(), revealed=hook)
            return render(request, "awareness/hooks.html", context, status=201)
        return render(request, "awareness/hooks.html", _hooks_context(form), status=400)
    context = _hooks_context(HookForm(), log_kind=request.GET.get("kind", ""))
    return render(request, "awareness/hooks.html", context)


@require_POST
@viewer_required
def hook_delete(request: HttpRequest, hook_id: int) -> HttpResponse:
    _require_hooks(request.user)
    hook = get_object_or_404(Hook, pk=hook_id)
    if hook.source == Hook.Source.ENV:
        messages.error(request, "This hook comes from PORTHOLE_WEBHOOK_URLS: remove it there.")
        return redirect("hooks")
    access.audit(request.user, "webhook.remove", hook.url[:200], hook=hook.pk)
    hook.delete()
    messages.success(request, "Webhook removed.")
    return redirect("hooks")


@require_POST
@viewer_required
def hook_rotate(request: HttpRequest, hook_id: int) -> HttpResponse:
    _require_hooks(request.user)
    hook = get_object_or_404(Hook, pk=hook_id)
    hook.secret = new_secret()
    hook.save(update_fields=["secret"])
    access.audit(request.user, "webhook.rotate", hook.url[:200], hook=hook.pk)
    return render(request, "awareness/hooks.html", _hooks_context(HookForm(), revealed=hook))


@require_POST
@viewer_required
def hook_toggle(request: HttpRequest, hook_id: int) -> HttpResponse:
    _require_hooks(request.user)
    hook = get_object_or_404(Hook, pk=hook_id)
    hook.active = not hook.active
    hook.save(update_fields=["active"])
    action = "webhook.resume" if hook.active else "webhook.pause"
    access.audit(request.user, action, hook.url[:200], hook=hook.pk)
    return redirect("hooks")


# -- the attention feed, for notifications and the tab title -------------------------------------


def _watched(raw: str) -> list[uuid.UUID]:
    ids = []
    for part in raw.split(",")[:WATCH_LIMIT]:
        try:
            ids.append(uuid.UUID(part.strip()))
        except ValueError:
            continue
    return ids


def _notice(session: AgentSession, verdict: attention.Attention) -> tuple[str, str]:
    """What a notification would say about this session now: (kind, key). The key changes
    exactly when there is something new to tell."""
    if session.status == AgentSession.Status.EXITED and session.exit_code not in (0, None):
        return Kind.FAILED, f"failed:{session.exit_code}"
    if session.status == AgentSession.Status.LOST:
        return Kind.LOST, "lost"
    if session.status in (AgentSession.Status.EXITED, AgentSession.Status.KILLED):
        return Kind.FINISHED, "finished"
    if verdict:
        return Kind.NEEDS_ATTENTION, f"attention:{verdict.turn}"
    return "", ""


@require_GET
@viewer_required
def attention_feed(request: HttpRequest) -> JsonResponse:
    """The sessions this person started or watches (recent or live), with what is new about
    each. Polled by notify.js in one tab of the browser."""
    horizon = timezone.now() - timedelta(days=FEED_HORIZON_DAYS)
    mine = Q(started_by=request.user) | Q(pk__in=_watched(request.GET.get("watch", "")))
    recent = Q(status__in=AgentSession.LIVE_STATUSES) | Q(last_event_at__gte=horizon)
    sessions = attention.with_attention(AgentSession.objects.filter(mine & recent)).order_by(
        "-started_at"
    )[:200]
    items = []
    count = 0
    for session in sessions:
        verdict = attention.of(session)
        count += bool(verdict)
        kind, key = _notice(session, verdict)
        changed = session.last_event_at or session.started_at
        if verdict.reasons == ("idle",):  # it became news when the threshold passed
            changed += attention.idle_threshold()
        items.append(
            {
                "id": str(session.pk),
                "title": session.title or session.upstream_id,
                "url": reverse("session", args=[session.pk]),
                "status": session.get_status_display(),
                "attention": bool(verdict),
                "reasons": verdict.labels,
                "kind": kind,
                "key": key,
                "changed_at": changed.isoformat(),
            }
        )
    return JsonResponse({"count": count, "sessions": items, "now": timezone.now().isoformat()})
