"""Every shipped pipeline file validates (from the repository root, as the README runs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

ROOT = Path(__file__).parent.parent
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipeline_validates(path, tmp_path):
    overrides = []
    if "vars.model" in path.read_text():  # a Hugging Face folder of the user's: a stand-in
        overrides += ["--set", f"vars.model={tmp_path}"]
    if not SHARED_DATA.is_dir():  # point the data variables at stand-ins
        (tmp_path / "text.txt").write_text("to be or not to be\n" * 50)
        for name, value in (("data", tmp_path / "text.txt"), ("tasks", tmp_path)):
            if f"vars.{name}" in path.read_text():
                overrides += ["--set", f"vars.{name}={value}"]
    run = subprocess.run([sys.executable, "-m", "gptflow.cli", "validate", str(path),
                          *overrides], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout


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
