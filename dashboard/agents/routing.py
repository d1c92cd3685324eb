from django.urls import path

from dashboard.agents import consumers

websocket_urlpatterns = [
    path("ws/sessions/", consumers.SessionListConsumer.as_asgi()),
    path("ws/sessions/<uuid:session_id>/", consumers.SessionConsumer.as_asgi()),
    path("ws/share/<str:token>/", consumers.ShareSessionConsumer.as_asgi()),
]
