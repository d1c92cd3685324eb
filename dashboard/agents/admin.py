from django.contrib import admin

from dashboard.agents.models import AgentSession, Event, Sandbox


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin):
    list_display = ["upstream_id", "status", "template", "created_by", "created_at"]
    list_filter = ["status"]
    search_fields = ["upstream_id"]


@admin.register(AgentSession)
class AgentSessionAdmin(admin.ModelAdmin):
    list_display = ["title", "status", "sandbox", "model", "started_by", "started_at"]
    list_filter = ["status", "origin"]
    search_fields = ["title", "prompt", "upstream_id", "claude_session_id"]
    list_select_related = ["sandbox", "started_by"]
    raw_id_fields = ["sandbox", "resumed_from", "started_by"]
    # The config holds MCP servers' environment values: secrets, not for display.
    exclude = ["config"]


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["session", "seq", "source", "type", "subtype", "created_at"]
    list_filter = ["source", "type"]
    raw_id_fields = ["session", "actor"]
    list_select_related = ["session"]
