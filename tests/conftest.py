from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import MODELS, Running, gateway_in_thread


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
