from django.urls import path

from dashboard.agents import views

urlpatterns = [
    path("", views.index, name="index"),
    path("sessions/<uuid:session_id>/", views.session_detail, name="session"),
    path(
        "sessions/<uuid:session_id>/events/<int:seq>/raw",
        views.event_raw,
        name="event_raw",
    ),
]
