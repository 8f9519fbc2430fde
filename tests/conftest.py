from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Running, gateway_in_thread


@pytest.fixture(scope="session")
def bundled() -> Iterator[Running]:
    """The gateway on the bundled models, shared by read-only tests."""
    with gateway_in_thread() as running:
        yield running
