from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import MODELS, Running, gateway_in_thread

# Each folder is a kind of test; the kind is also a marker (`-m unit`), so either
# `pytest tests/unit` or `pytest -m unit` is the inner loop.
KINDS = ("unit", "integration", "simulation")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in KINDS:
            if kind in item.path.parts:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def bundled() -> Iterator[Running]:
    """The gateway on the bundled models, shared by read-only tests."""
    with gateway_in_thread() as running:
        yield running


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of the module's own (a copy of the bundled digits), for tests that change it."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(MODELS / "digits", root / "digits")
    return root
