"""Reading aids for the session page, as template tags so that the page's view (another
module's) needs no change: `{% session_outline session %}`."""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString

from dashboard.agents.models import AgentSession
from dashboard.agents.rendering.outline import outline
from dashboard.agents.rendering.templates import render

register = template.Library()


@register.simple_tag
def session_outline(session: AgentSession) -> SafeString:
    return render("outline_list", entries=outline(session))
