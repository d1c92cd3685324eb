"""The Daphne glue: finding Daphne's protocol through middleware, and write back-pressure."""

from __future__ import annotations

import functools
from types import SimpleNamespace

from channels.sessions import InstanceSessionWrapper
from twisted.internet.testing import StringTransport

from dashboard.daphne_glue import WriteGate, _daphne_protocol


async def _handle_reply(protocol: object, message: dict) -> None:  # Daphne's signature
    return None


def test_it_finds_daphnes_protocol_through_channels_session_middleware():
    protocol = SimpleNamespace(transport=StringTransport())
    send = functools.partial(_handle_reply, protocol)
    wrapped = InstanceSessionWrapper({"type": "websocket", "cookies": {}}, send).send
    assert _daphne_protocol(send) is protocol
    assert _daphne_protocol(wrapped) is protocol


def test_it_falls_back_to_always_writable_under_other_servers():
    async def plain_send(message: dict) -> None:
        return None

    assert _daphne_protocol(plain_send) is None
    assert WriteGate(plain_send).writable


def test_it_follows_twisteds_pause_and_resume_of_the_send_buffer():
    transport = StringTransport()
    gate = WriteGate(functools.partial(_handle_reply, SimpleNamespace(transport=transport)))
    assert gate.writable
    transport.producer.pauseProducing()  # what Twisted does past its buffer size
    assert not gate.writable
    transport.producer.resumeProducing()  # ...and once the client has drained it
    assert gate.writable
