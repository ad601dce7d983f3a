"""Every shipped pipeline file validates (from the repository root, as the README runs them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipeline_validates(path, tmp_path, monkeypatch):
    """As a user with the data at hand: $GPTFLOW_DATA where it is set (CI points it
    at a copy), else stand-ins for the tasks (generated task files under those
    names) and the texts (a file named instead)."""
    overrides = []
    text = path.read_text()
    if "vars.model" in text:  # a Hugging Face folder of the user's: a stand-in
        overrides += ["--set", f"vars.model={tmp_path}"]
    from gptflow.fetch import FetchError, fetch

    try:
        [fetch(v) for v in _named_data(yaml.safe_load(text))]
    except FetchError:
        monkeypatch.setenv("GPTFLOW_DATA", str(tmp_path / "data"))
        for name in _named_data(yaml.safe_load(text)):
            if name.startswith("ni:"):
                _stand_in_task(tmp_path / "data", name)
        (tmp_path / "text.txt").write_text("to be or not to be\n" * 50)
        for var in ("data", "heldout"):
            if f"vars.{var}" in text:
                overrides += ["--set", f"vars.{var}={tmp_path / 'text.txt'}"]
    run = subprocess.run([sys.executable, "-m", "gptflow.cli", "validate", str(path),
                          *overrides], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipelines_name_nothing_outside_the_repository(path):
    """A clone needs nothing beside it: data comes by name (ni:, data:), from a
    package (package:), or from inside the repository."""
    for value in _strings(yaml.safe_load(path.read_text())):
        if "/" in value and ":" not in value.split("/")[0]:
            where = (path.parent / value).resolve()
            assert where.is_relative_to(ROOT.resolve()), (path.name, value)


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _named_data(pipeline):
    from gptflow.fetch import is_named

    return sorted({v for v in _strings(pipeline) if is_named(v)})


def _stand_in_task(folder, name):
    from gptflow.fetch import Task

    task = Task.parse(name)
    path = folder / "natural-instructions" / f"{task.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "Definition": ["Answer."], "Positive Examples": [{"input": "a", "output": "b"}],
        "Instances": [{"id": str(i), "input": f"q{i}", "output": ["a"]}
                      for i in range(task.n or 10)]}))


def test_shipped_pipelines_match_the_json_schema():
    """One contract, two checkers: what `gptflow validate` accepts, the JSON Schema
    editors use (`gptflow schema`) accepts too."""
    import jsonschema
    import yaml

    from gptflow.describe import pipeline_schema
    from gptflow.manager import load_plugins

    validator = jsonschema.Draft202012Validator(pipeline_schema(load_plugins()))
    for path in PIPELINES:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
                  for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path.name, errors[:3])


def test_quickstart_is_the_readme_pipeline():
    readme = (ROOT / "README.md").read_text()
    assert "gptflow run pipelines/quickstart.yaml" in readme
    assert (ROOT / "pipelines" / "quickstart.yaml").is_file()
