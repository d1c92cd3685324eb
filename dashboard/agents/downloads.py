"""A session as a streamed download (JSONL or Markdown), a few at a time per person.

Under ASGI, Django buffers a StreamingHttpResponse whose content is a plain iterator in
full before sending a byte (it cannot iterate it on the event loop). The downloads are
async iterators instead: a bounded chunk of events is read and written out in a thread,
sent, and only then is the next one read. Memory is one chunk whatever the session's
length, and the first bytes leave after the first chunk.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.shortcuts import render

from dashboard.agents.export import Transcript, session_jsonl
from dashboard.agents.models import AgentSession, Event

EXPORT_CHUNK = 500
MAX_EXPORTS_PER_USER = 2
RETRY_AFTER = 10  # seconds: a download of a long session takes a few


def _events_after(session_id: Any, after: int, limit: int) -> list[Event]:
    return list(
        Event.objects.filter(session_id=session_id, seq__gt=after)
        .select_related("actor")
        .order_by("seq")[:limit]
    )


def _jsonl_chunk(session: AgentSession, after: int, limit: int) -> tuple[int, int, str]:
    events = _events_after(session.pk, after, limit)
    text = "".join(line + "\n" for line in session_jsonl(session, events))
    return (events[-1].seq if events else after), len(events), text


def _markdown_chunk(transcript: Transcript, after: int, limit: int) -> tuple[int, int, str]:
    events = _events_after(transcript.session.pk, after, limit)
    return (events[-1].seq if events else after), len(events), "".join(transcript.pieces(events))


async def _chunked(
    render: Callable[[int, int], tuple[int, int, str]], chunk: int
) -> AsyncIterator[str]:
    after = 0
    while True:
        after, count, text = await database_sync_to_async(render)(after, chunk)
        if text:
            yield text
        if count < chunk:
            return


async def stream_jsonl(
    session: AgentSession, chunk: int = EXPORT_CHUNK
) -> AsyncGenerator[str, None]:
    """The JSONL export, `chunk` events per database query."""
    async for text in _chunked(lambda after, limit: _jsonl_chunk(session, after, limit), chunk):
        yield text


async def stream_markdown(
    session: AgentSession, chunk: int = EXPORT_CHUNK
) -> AsyncGenerator[str, None]:
    """The Markdown export, `chunk` events per database query; the header comes first."""
    transcript = Transcript(session)
    yield transcript.header()
    async for text in _chunked(
        lambda after, limit: _markdown_chunk(transcript, after, limit), chunk
    ):
        yield text


class ExportSlots:
    """How many downloads each person has running in this process."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self.running: Counter[object] = Counter()

    def take(self, who: object) -> Callable[[], None] | None:
        """A release function when `who` may start one more, else None."""
        if self.running[who] >= self.per_user:
            return None
        self.running[who] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.running[who] -= 1
                if self.running[who] <= 0:
                    del self.running[who]

        return release


SLOTS = ExportSlots(MAX_EXPORTS_PER_USER)


async def _releasing(
    content: AsyncGenerator[str, None], release: Callable[[], None]
) -> AsyncIterator[str]:
    try:
        async with aclosing(content):
            async for text in content:
                yield text
    finally:
        release()


class _Download(StreamingHttpResponse):
    """A streamed download that gives its slot back when the server is done with it.

    Django closes the response when the download ends, fails in the view, or the browser
    says it left; but when sending fails (a server whose client vanished) or the request's
    task is cancelled, it skips close(). So the slot also comes back when the content's
    iterator is closed or finalised (the server's `aclosing`, or the event loop), and, for a
    response never iterated nor closed, when the response itself is collected."""

    def __init__(
        self, content: AsyncGenerator[str, None], release: Callable[[], None], **kw: Any
    ) -> None:
        super().__init__(_releasing(content, release), **kw)
        self._release = release
        weakref.finalize(self, release)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()


def _refused(request: HttpRequest, session: AgentSession) -> HttpResponse:
    """429: too many at once. A browser that followed the download link gets a page that
    says so (the link has no `download` attribute, so that it is shown); anything else, a
    line of text."""
    message = (
        f"You already have {SLOTS.per_user} downloads running. Wait for one of them to "
        "finish, then try again."
    )
    if "text/html" in request.headers.get("Accept", ""):
        context = {"message": message, "session": session, "retry_after": RETRY_AFTER}
        response = render(request, "agents/session.html#downloads-busy", context, status=429)
    else:
        response = HttpResponse(message + "\n", content_type="text/plain; charset=utf-8")
        response.status_code = 429
    response["Retry-After"] = str(RETRY_AFTER)
    return response


def download(
    request: HttpRequest, session: AgentSession, kind: str, filename: str
) -> HttpResponseBase:
    """The session as a streamed `kind` ("jsonl" or "md") download, or a 429 when the person
    already runs as many as allowed."""
    release = SLOTS.take(request.user.pk if request.user.is_authenticated else None)
    if release is None:
        return _refused(request, session)
    if kind == "jsonl":
        content, mime = stream_jsonl(session), "application/x-ndjson; charset=utf-8"
    else:
        content, mime = stream_markdown(session), "text/markdown; charset=utf-8"
    streamed = _Download(content, release, content_type=mime)
    streamed["Content-Disposition"] = f'attachment; filename="{filename}"'
    return streamed
