from django.urls import path

from dashboard.agents import people, workspace
from dashboard.agents.views import browse, export, sandboxes, share, start, steer

urlpatterns = [
    path("", browse.index, name="index"),
    path("sessions/new/", start.new_session, name="new_session"),
    path("sessions/acknowledge/", steer.sessions_acknowledge, name="sessions_acknowledge"),
    path("sessions/<uuid:session_id>/", browse.session_detail, name="session"),
    path("sessions/<uuid:session_id>/older/", browse.older_events, name="older_events"),
    path("sessions/<uuid:session_id>/newer/", browse.newer_events, name="newer_events"),
    path("sessions/<uuid:session_id>/prompt/", steer.session_prompt, name="session_prompt"),
    path(
        "sessions/<uuid:session_id>/interrupt/", steer.session_interrupt, name="session_interrupt"
    ),
    path(
        "sessions/<uuid:session_id>/configure/", steer.session_configure, name="session_configure"
    ),
    path("sessions/<uuid:session_id>/kill/", steer.session_kill, name="session_kill"),
    path("sessions/<uuid:session_id>/continue/", steer.session_continue, name="session_continue"),
    path(
        "sessions/<uuid:session_id>/acknowledge/",
        steer.session_acknowledge,
        name="session_acknowledge",
    ),
    path("sessions/<uuid:session_id>/export.jsonl", export.export_jsonl, name="export_jsonl"),
    path("sessions/<uuid:session_id>/export.md", export.export_markdown, name="export_markdown"),
    path("sessions/<uuid:session_id>/events/<int:seq>/raw", export.event_raw, name="event_raw"),
    path("sessions/<uuid:session_id>/changes/", workspace.changes, name="workspace_changes"),
    path("sessions/<uuid:session_id>/changes/file", workspace.changed_file, name="workspace_file"),
    path("sessions/<uuid:session_id>/share/", share.share_create, name="share_create"),
    path("share-links/<int:link_id>/revoke/", share.share_revoke, name="share_revoke"),
    path("share/<str:token>/", share.share_page, name="share"),
    path("share/<str:token>/older/", share.share_older, name="share_older"),
    path("share/<str:token>/newer/", share.share_newer, name="share_newer"),
    path("setup/", people.setup, name="setup"),
    path("people/", people.people, name="people"),
    path("people/<int:user_id>/", people.person_update, name="person_update"),
    path("sandboxes/", sandboxes.sandboxes, name="sandboxes"),
    path(
        "sandboxes/<str:sandbox_id>/agents/<str:agent_id>/attach/",
        sandboxes.sandbox_attach,
        name="sandbox_attach",
    ),
    path("sandboxes/<str:sandbox_id>/kill/", sandboxes.sandbox_kill, name="sandbox_kill"),
]
