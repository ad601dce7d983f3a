"""What re-runs and what does not: each kind of change, and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PIPELINE = """\
name: cache
vars: {n: 1}
nodes:
  a: {plugin: text, params: {text: a, repeat: "${vars.n}"}}
  b: {plugin: read, params: {path: DATA}}
  c:
    plugin: concat
    inputs: {parts: [a, b]}
  d: {plugin: text, params: {text: d}}
"""


@pytest.fixture
def pipeline(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("one")
    return PIPELINE.replace("DATA", str(data)), data


def statuses(result):
    return {n: v["status"] for n, v in result.record["nodes"].items()}


def test_second_run_is_fully_cached(run_pipeline, pipeline):
    text, _ = pipeline
    assert statuses(run_pipeline(text)) == dict.fromkeys("abcd", "ran")
    again = run_pipeline(text)
    assert again.code == 0
    assert statuses(again) == dict.fromkeys("abcd", "cached")


def test_param_change_reruns_node_and_downstream_only(run_pipeline, pipeline):
    text, _ = pipeline
    run_pipeline(text)
    result = run_pipeline(text, "--set", "vars.n=2")
    assert statuses(result) == {"a": "ran", "b": "cached", "c": "ran", "d": "cached"}
    assert result.record["nodes"]["a"]["reason"] == "params changed: repeat"
    assert result.record["nodes"]["c"]["reason"] == "upstream changed: parts"
    assert (result.output("c") / "text.txt").read_text() == "aa+one"


def test_input_file_content_change_reruns(run_pipeline, pipeline):
    text, data = pipeline
    run_pipeline(text)
    data.write_text("two")
    result = run_pipeline(text)
    assert statuses(result) == {"a": "cached", "b": "ran", "c": "ran", "d": "cached"}
    assert result.record["nodes"]["b"]["reason"].startswith("data changed")
    # touching without changing content re-hashes but does not re-run
    os.utime(data, ns=(1, 1))
    touched = run_pipeline(text)
    assert set(statuses(touched).values()) == {"cached"}, touched.record


def test_plugin_version_change_reruns(run_pipeline, pipeline, monkeypatch):
    text, _ = pipeline
    run_pipeline(text)
    import toy_nodes

    monkeypatch.setattr(toy_nodes, "VERSION", "2")
    result = run_pipeline(text)
    # a and d re-run; a's bytes come out the same, so c, below it, stays cached
    assert statuses(result) == {"a": "ran", "b": "cached", "c": "cached", "d": "ran"}
    assert result.record["nodes"]["a"]["reason"] == "plugin version 1 -> 2"


def test_only_from_force(run_pipeline, pipeline):
    text, _ = pipeline
    assert statuses(run_pipeline(text, "--only", "a", "d")) == {"a": "ran", "d": "ran"}
    result = run_pipeline(text, "--only", "c")
    assert result.code == 2
    assert "node 'b' is needed but not selected" in result.err
    assert statuses(run_pipeline(text, "--from", "b")) == {"a": "cached", "b": "ran", "c": "ran"}
    forced = run_pipeline(text, "--force", "b")
    assert statuses(forced) == dict(a="cached", b="ran", c="cached", d="cached")
    assert set(statuses(run_pipeline(text, "--force")).values()) == {"ran"}


def test_dry_run_runs_nothing(run_pipeline, pipeline):
    text, _ = pipeline
    result = run_pipeline(text, "--dry-run")
    assert result.code == 0
    assert "not run before" in result.out
    assert not (result.store.root / "runs").exists()


def test_failure_skips_downstream_and_exits_1(run_pipeline):
    result = run_pipeline("""\
name: f
nodes:
  bad: {plugin: fail, params: {message: the disk is on fire}}
  after: {plugin: slow, inputs: {after: bad}, params: {chunks: 1, seconds: 0}}
  other: {plugin: text}
""")
    assert result.code == 1
    assert statuses(result) == {"bad": "failed", "after": "skipped", "other": "ran"}
    assert "FAILED: the disk is on fire" in result.out
    log = result.record["nodes"]["bad"]["log"]
    assert "NodeError: the disk is on fire" in Path(log).read_text()
    assert not list((result.store.root / "tmp").iterdir())  # staging removed


def test_parallel_jobs(run_pipeline, pipeline):
    text, _ = pipeline
    result = run_pipeline(text, "--jobs", "2")
    assert result.code == 0, result.out + result.err
    assert statuses(result) == dict.fromkeys("abcd", "ran")
    assert (result.output("c") / "text.txt").read_text() == "a+one"
    assert set(statuses(run_pipeline(text, "-j", "2")).values()) == {"cached"}
