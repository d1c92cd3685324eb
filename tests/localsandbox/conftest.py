from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import LocalSandbox
from tests.localsandbox.helpers import api_client


@pytest.fixture
async def api(localsandbox: LocalSandbox) -> AsyncIterator[httpx.AsyncClient]:
    # The server is shared by the whole run: if it has died, say how, not "connection refused".
    status = localsandbox.process.poll()
    assert status is None, (
        f"the shared localsandbox exited ({status}):\n{''.join(localsandbox.log)}"
    )
    async with api_client(localsandbox) as client:
        yield client


@pytest.fixture
async def sandbox_id(api: httpx.AsyncClient) -> AsyncIterator[str]:
    """A fresh sandbox on the shared server, deleted afterwards."""
    response = await api.post("/sandboxes", json={})
    assert response.status_code == 201, response.text
    sandbox_id = response.json()["sandboxID"]
    yield sandbox_id
    await api.delete(f"/sandboxes/{sandbox_id}")
