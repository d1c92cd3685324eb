from django.urls import path

from dashboard.agents import people, sharing, views

urlpatterns = [
    path("", views.index, name="index"),
    path("sessions/new/", views.new_session, name="new_session"),
    path("sessions/<uuid:session_id>/", views.session_detail, name="session"),
    path("sessions/<uuid:session_id>/older/", views.older_events, name="older_events"),
    path("sessions/<uuid:session_id>/prompt/", views.session_prompt, name="session_prompt"),
    path(
        "sessions/<uuid:session_id>/interrupt/", views.session_interrupt, name="session_interrupt"
    ),
    path(
        "sessions/<uuid:session_id>/configure/", views.session_configure, name="session_configure"
    ),
    path("sessions/<uuid:session_id>/kill/", views.session_kill, name="session_kill"),
    path("sessions/<uuid:session_id>/continue/", views.session_continue, name="session_continue"),
    path("sessions/<uuid:session_id>/export.jsonl", views.export_jsonl, name="export_jsonl"),
    path("sessions/<uuid:session_id>/export.md", views.export_markdown, name="export_markdown"),
    path("sessions/<uuid:session_id>/events/<int:seq>/raw", views.event_raw, name="event_raw"),
    path("sessions/<uuid:session_id>/share/", sharing.share_create, name="share_create"),
    path("share-links/<int:link_id>/revoke/", sharing.share_revoke, name="share_revoke"),
    path("share/<str:token>/", sharing.share_page, name="share"),
    path("share/<str:token>/older/", sharing.share_older, name="share_older"),
    path("setup/", people.setup, name="setup"),
    path("people/", people.people, name="people"),
    path("people/<int:user_id>/", people.person_update, name="person_update"),
    path("sandboxes/", views.sandboxes, name="sandboxes"),
    path(
        "sandboxes/<str:sandbox_id>/agents/<str:agent_id>/attach/",
        views.sandbox_attach,
        name="sandbox_attach",
    ),
    path("sandboxes/<str:sandbox_id>/kill/", views.sandbox_kill, name="sandbox_kill"),
]
