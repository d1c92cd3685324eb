"""Porthole's web server: uvicorn, with the options every web worker runs with.

`manage.py serve` runs it in its own event loop beside the bridges (`uvicorn_config`); a
team's web workers run the same options from the command line (`command_line`, the line
docs/deploy.md gives). Why uvicorn rather than Daphne: it writes a WebSocket frame straight
to the socket, where Daphne (Twisted) registers the socket with the event loop around each
write. With 100 and 300 viewers of one session, that was most of a worker's CPU, and the
tails halved under uvicorn (docs/benchmarks.md, "Eighth round"). Its `send` waits while a
viewer's socket is full, which the session consumer never lets hold up the others
(`SessionConsumer._send_without_waiting`).

Daphne stays for the embedded sandbox server (`dashboard/localsandbox`), whose sockets are
few and whose flow control is written against Twisted (`daphne_glue.py`).
"""

from __future__ import annotations

from typing import Any

import uvicorn

OPTIONS: dict[str, Any] = {
    "ws": "websockets-sansio",
    # Compressing every frame once per viewer (each socket has its own compressor) would
    # cost CPU per viewer for what loopback and LAN links carry cheaply.
    "ws_per_message_deflate": False,
    # A page sends only its hello, acknowledgements and the list's rows (about 20 KiB).
    "ws_max_size": 1024 * 1024,
    "lifespan": "off",  # the application is Django's: it neither speaks lifespan nor needs it
    # Which proxies to believe is PORTHOLE_TRUSTED_PROXIES' call, in the application:
    # uvicorn would otherwise rewrite the peer from X-Forwarded-For for any loopback peer.
    "proxy_headers": False,
    "access_log": False,
    "server_header": False,
    # Longer than nginx keeps an idle upstream connection (60 s): closed first by this side,
    # a connection nginx had just picked for a POST would fail it with a 502.
    "timeout_keep_alive": 75,
    # SIGTERM: sockets are told 1012 (pages reconnect elsewhere) and requests get this long.
    "timeout_graceful_shutdown": 10,
}


# Options uvicorn's command line takes as --name / --no-name rather than --name VALUE.
_SWITCHES = {"proxy_headers", "access_log", "server_header"}


def uvicorn_config(application: Any, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """The server's configuration for this process; logging is Django's (`LOGGING`)."""
    return uvicorn.Config(
        application, host=host, port=port, log_config=None, **{**OPTIONS, **overrides}
    )


def command_line(host: str, port: int, app: str = "dashboard.asgi:application") -> list[str]:
    """`uvicorn` with `OPTIONS`, as a team's web worker runs it."""
    flags = ["--host", host, "--port", str(port)]
    for name, value in OPTIONS.items():
        flag = name.replace("_", "-")
        if name in _SWITCHES:  # --flag / --no-flag
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value).lower() if isinstance(value, bool) else str(value)]
    return ["uvicorn", *flags, app]
