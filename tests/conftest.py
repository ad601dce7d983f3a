from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SHARED_DATA = TESTS.parent.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _toy_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees the toy node types and no third-party autoload."""
    monkeypatch.setenv("GPTFLOW_PLUGINS", "toy_nodes")
    monkeypatch.setenv("GPTFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.delenv("GPTFLOW_STORE", raising=False)
