"""Pytest fixtures for plugin authors (installed as the pytest plugin ``gptflow``).

* ``gptflow_store``: an empty store in a temporary folder.
* ``run_pipeline``: write a pipeline (YAML text or dict) and run a gptflow verb
  on it in-process, against that store; returns a :class:`Result`.

Example::

    def test_my_node(run_pipeline):
        result = run_pipeline({"name": "t", "nodes": {"a": {"plugin": "my-node"}}})
        assert result.code == 0, result.err
        assert result.record["nodes"]["a"]["status"] == "ran"
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gptflow.store import Store


@dataclass
class Result:
    code: int
    out: str
    err: str
    store: Store
    pipeline: Path

    @property
    def record(self) -> dict[str, Any]:
        """The latest run's run.json, as ``gptflow show --json`` prints it."""
        return self.store.load_run(self.store.resolve_run("latest")).to_json()

    def output(self, node: str, name: str | None = None) -> Path:
        """The artifact folder of a node's output in the latest run."""
        from gptflow.dag import pick_output

        outputs = self.record["nodes"][node]["outputs"]
        return Path(outputs[pick_output(node, name or "", outputs)])


@pytest.fixture
def gptflow_store(tmp_path: Path) -> Store:
    return Store(tmp_path / ".gptflow")


@pytest.fixture
def run_pipeline(tmp_path: Path, gptflow_store: Store,
                 capfd: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    from gptflow.cli import main

    def run(pipeline: str | dict[str, Any], *args: str, verb: str = "run") -> Result:
        path = tmp_path / "pipeline.yaml"
        text = pipeline if isinstance(pipeline, str) else yaml.safe_dump(pipeline, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        capfd.readouterr()
        code = main([verb, str(path), "--store", str(gptflow_store.root), *args])
        out, err = capfd.readouterr()
        return Result(code, out, err, gptflow_store, path)

    return run


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
