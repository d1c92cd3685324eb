"""Error mapping and redaction (status codes the embedded server cannot produce are served by
a tiny loopback server; see test_integration.py for the real 401/404 paths)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dashboard.opencomputer import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    OpenComputer,
    OpenComputerError,
    PayloadTooLarge,
    ProtocolError,
    RateLimited,
    ServerError,
    Unauthorized,
    connect_stream,
    redact,
)
from dashboard.opencomputer.errors import error_from_response

from .loopback import Reply, loopback

KEY = "sk-test/secret+key=42"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (429, RateLimited),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
    ],
)
async def test_it_maps_each_status_to_its_error(status: int, cls: type[OpenComputerError]) -> None:
    routes = {("GET", "/api/sandboxes"): Reply(status, {"error": f"nope {status}"})}
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(cls) as caught:
            await oc.list_sandboxes()
    error = caught.value
    assert type(error) is cls
    assert error.status == status
    assert error.message == f"nope {status}"
    assert f"HTTP {status}" in str(error) and "GET" in str(error) and "/api/sandboxes" in str(error)


async def test_it_maps_an_unlisted_4xx_to_the_base_error() -> None:
    routes = {("GET", "/api/sandboxes"): Reply(418, {"error": "teapot"})}
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(OpenComputerError) as caught:
            await oc.list_sandboxes()
    assert type(caught.value) is OpenComputerError and caught.value.status == 418


async def test_it_reads_retry_after_on_429() -> None:
    routes = {("GET", "/api/sandboxes"): Reply(429, {"error": "slow down"}, {"Retry-After": "7"})}
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(RateLimited) as caught:
            await oc.list_sandboxes()
    assert caught.value.retry_after == 7.0


async def test_it_makes_a_useful_message_from_a_non_json_body() -> None:
    html = (
        "<html><body><h1>503 Service Temporarily Unavailable</h1>" + "x" * 5000 + "</body></html>"
    )
    routes = {("GET", "/api/sandboxes/sb-1"): Reply(503, html)}
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(ServerError) as caught:
            await oc.get_sandbox("sb-1")
    error = caught.value
    assert error.status == 503
    assert error.message.startswith("503 Service Unavailable: <html><body><h1>503 Service")
    assert len(error.message) < 300 and error.message.endswith("…")


async def test_it_makes_a_message_from_an_empty_body_and_json_without_error() -> None:
    routes = {
        ("DELETE", "/api/sandboxes/a"): Reply(500, b""),
        ("DELETE", "/api/sandboxes/b"): Reply(400, {"message": "bad thing"}),
        ("DELETE", "/api/sandboxes/c"): Reply(400, {"code": 7}),
    }
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(ServerError) as a:
            await oc.kill_sandbox("a")
        with pytest.raises(BadRequest) as b:
            await oc.kill_sandbox("b")
        with pytest.raises(BadRequest) as c:
            await oc.kill_sandbox("c")
    assert a.value.message == "500 Internal Server Error"
    assert b.value.message == "bad thing"
    assert c.value.message == '400 Bad Request: {"code": 7}'


async def test_it_uses_a_custom_reason_phrase_when_the_body_is_empty() -> None:
    routes = {
        ("GET", "/api/sandboxes"): Reply(401, b"", reason="missing or invalid credentials"),
        ("GET", "/api/sandboxes/x"): Reply(404, b"", reason="Not Found"),
    }
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(Unauthorized) as custom:
            await oc.list_sandboxes()
        with pytest.raises(NotFound) as standard:
            await oc.get_sandbox("x")
    assert custom.value.message == "missing or invalid credentials"
    assert standard.value.message == "404 Not Found"


async def test_it_raises_protocol_error_for_malformed_success_bodies() -> None:
    routes = {
        ("GET", "/api/sandboxes"): Reply(200, "not json"),
        ("GET", "/api/sandboxes/x"): Reply(200, {"status": "running"}),
        ("GET", "/api/sandboxes/x/agent"): Reply(200, {"not": "a list"}),
    }
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(ProtocolError, match="not JSON"):
            await oc.list_sandboxes()
        with pytest.raises(ProtocolError, match="sandboxID"):
            await oc.get_sandbox("x")
        with pytest.raises(ProtocolError, match="array"):
            await oc.list_agents("x")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_it_raises_connection_failed_when_nothing_listens() -> None:
    async with OpenComputer(f"http://127.0.0.1:{closed_port()}", KEY) as oc:
        with pytest.raises(ConnectionFailed) as caught:
            await oc.list_sandboxes()
    assert caught.value.status is None
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


async def test_it_raises_connection_failed_on_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with OpenComputer(f"http://127.0.0.1:{port}", KEY, timeout=0.2) as oc:
            with pytest.raises(ConnectionFailed, match="timed out"):
                await oc.list_sandboxes()
    finally:
        for writer in accepted:
            writer.close()
        server.close()


def test_it_redacts_credentials_in_query_strings() -> None:
    url = "wss://h/api/sandboxes/s/exec/e?api_key=abc%2Fdef&x=1&token=eyJ.x.y#frag"
    assert (
        redact(url) == "wss://h/api/sandboxes/s/exec/e?api_key=[redacted]&x=1&token=[redacted]#frag"
    )
    assert redact("GET /x?API_KEY=zzz") == "GET /x?API_KEY=[redacted]"


def test_it_redacts_given_secrets_raw_and_quoted() -> None:
    text = f"bad key {KEY} or sk-test%2Fsecret%2Bkey%3D42"
    assert KEY not in redact(text, [KEY])
    assert "secret" not in redact(text, [KEY])
    assert redact("nothing", ["", None]) == "nothing"


def test_it_never_puts_the_key_in_an_error_built_from_a_url() -> None:
    url = f"ws://h/api/sandboxes/s/exec/e?api_key={KEY}"
    error = error_from_response(
        401, b'{"error":"invalid api key ' + KEY.encode() + b'"}', url=url, secrets=[KEY]
    )
    assert isinstance(error, Unauthorized)
    for text in (str(error), repr(error), error.message, error.url or ""):
        assert KEY not in text
    assert "api_key=[redacted]" in str(error)
    # Even without the secrets list, the query value is masked.
    plain = ConnectionFailed("refused", url="ws://h/x?token=t0k3n&api_key=k3y")
    assert "t0k3n" not in str(plain) and "k3y" not in str(plain)


async def test_it_keeps_the_key_out_of_a_failed_stream_connect() -> None:
    url = f"ws://127.0.0.1:{closed_port()}/api/sandboxes/s/exec/e?api_key={KEY}"
    with pytest.raises(ConnectionFailed) as caught:
        await connect_stream(url, secrets=[KEY], open_timeout=2)
    error = caught.value
    assert error.__cause__ is None and error.__suppress_context__
    for text in (str(error), repr(error), error.url or ""):
        assert KEY not in text and "secret" not in text


async def test_it_keeps_the_key_out_of_an_error_the_server_echoes() -> None:
    routes = {("GET", "/api/sandboxes"): Reply(401, {"error": f"unknown key {KEY}"})}
    async with loopback(routes) as server, OpenComputer(server.url, KEY) as oc:
        with pytest.raises(Unauthorized) as caught:
            await oc.list_sandboxes()
    assert KEY not in str(caught.value) and KEY not in caught.value.message
