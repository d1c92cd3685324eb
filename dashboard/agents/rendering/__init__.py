"""How every recorded event looks in the timeline, by concern:

- `base`: defensive accessors for hostile JSON, display caps, `clip`.
- `budget`: what one event (and one page render) may cost to render.
- `tools`: `ToolIndex`, pairing tool calls with their results across events, and the layout
  of a page render (cards, nesting, folds).
- `items`: the dataclasses the macros in `templates/agents/timeline.jinja` render.
- `agent`: the agent's own messages (assistant/user turns, init, result, system…).
- `calls`: tool calls and results as the blocks of their cards.
- `highlight`: Pygments highlighting and unified diffs.
- `porthole`: Porthole's events (dashboard actions, bridge observations).
- `outline`: the session page's jump list.
- `render`: `describe` and the entry points `render_event`, `render_event_oob` (and
  `render_event_live`, which also gives the element kept with the event), `render_timeline`.

Nothing from an event is marked safe except markdown that went through
`render_markdown`'s sanitiser (DESIGN §4.3) and code highlighted by Pygments (which escapes
every character it is given).
"""

from dashboard.agents.rendering.base import (
    DISPLAY_CAP,
    MAX_BLOCKS,
    MAX_PARTS,
    SUMMARY_CAP,
    TOOL_CAP,
    Clipped,
    clean_text,
    clip,
    dom_id,
    one_line,
    pretty_json,
)
from dashboard.agents.rendering.items import EventItem
from dashboard.agents.rendering.render import (
    LiveFragment,
    RenderedTimeline,
    describe,
    render_event,
    render_event_live,
    render_event_oob,
    render_timeline,
)
from dashboard.agents.rendering.tools import ToolIndex, ToolRef, ToolStatus

__all__ = [
    "DISPLAY_CAP",
    "MAX_BLOCKS",
    "MAX_PARTS",
    "SUMMARY_CAP",
    "TOOL_CAP",
    "Clipped",
    "EventItem",
    "LiveFragment",
    "RenderedTimeline",
    "ToolIndex",
    "ToolRef",
    "ToolStatus",
    "clean_text",
    "clip",
    "describe",
    "dom_id",
    "one_line",
    "pretty_json",
    "render_event",
    "render_event_live",
    "render_event_oob",
    "render_timeline",
]
