"""Trust (#15): what a node returns and writes is checked the moment it returns,
built-in sources carry a content version, one plugin can be switched off, and
parallel workers share the cores."""

from __future__ import annotations

import os
import sys

import pytest


def misbehave(how: str, after: bool = False) -> str:
    text = "name: m\nnodes:\n  a: {plugin: text}\n"
    inputs = ", inputs: {after: a}" if after else ""
    return text + f"  m: {{plugin: misbehave, params: {{how: {how}}}{inputs}}}\n"


@pytest.mark.parametrize(("how", "metrics"), [
    ("numpy", {"acc": 0.5, "n": 3, "per_class": [0.25]}),
    ("torch", {"loss": 1.5}),
])
def test_numpy_and_torch_scalars_become_plain_numbers(run_pipeline, how, metrics):
    result = run_pipeline(misbehave(how))
    assert result.code == 0, result.out
    got = result.record["nodes"]["m"]["metrics"]
    assert {k: got[k] for k in metrics} == metrics
    assert all(type(v) in (int, float) for v in (got.get("acc", 0), got.get("n", 0)))


@pytest.mark.parametrize(("how", "error"), [
    ("set", "node type 'misbehave': metric 'labels' is a set, not a number"),
    ("list", "run() of node type 'misbehave' returned a list, not a mapping"),
    ("beside", "wrote stray.txt beside its output folders"),
    ("symlink", "output 'data': host links outside it (to /etc/hostname)"),
])
def test_a_node_that_misbehaves_fails_naming_what_it_did(run_pipeline, how, error):
    result = run_pipeline(misbehave(how))
    assert result.code == 1
    assert error in result.record["nodes"]["m"]["error"]
    assert not (result.store.root / "artifacts" / result.record["nodes"]["m"]["fingerprint"]
                ).exists()


def test_a_node_may_not_change_its_inputs(run_pipeline):
    result = run_pipeline(misbehave("input", after=True))
    assert result.code == 1
    error = result.record["nodes"]["m"]["error"]
    assert "changed its input 'after'" in error and "new.txt: not part of the artifact" in error
    again = run_pipeline(misbehave("text"))  # the damaged input is now corrupt: refused
    assert again.record["nodes"]["a"]["status"] == "failed"


def test_builtin_sources_carry_their_content_version(tmp_path, monkeypatch):
    """Another Python's standard library is another python-docs corpus: another
    fingerprint, and `plan` says why."""
    from gptflow import sources
    from gptflow.session import Session

    path = tmp_path / "b.yaml"
    path.write_text("name: b\nnodes:\n  t: {plugin: tokenize, params: "
                    "{corpus: [builtin:python-docs], vocab_size: 300}}\n")
    (here,) = Session.load(path, store=tmp_path / "s").plan()
    assert here.manifest["files"]["builtin:python-docs"] == {
        "version": f"python {sys.version}"}
    python = sources.BUILTINS["python-docs"]
    monkeypatch.setitem(sources.BUILTINS, "python-docs",
                        type(python)(python.kind, python.doc, version=lambda: "python 9.9"))
    (there,) = Session.load(path, store=tmp_path / "s").plan()
    assert there.fingerprint != here.fingerprint


def test_one_plugin_can_be_switched_off(run_pipeline, monkeypatch):
    monkeypatch.setenv("GPTFLOW_DISABLE_PLUGINS", "toy_nodes,gptflow_mlflow")
    result = run_pipeline("name: t\nnodes:\n  a: {plugin: text}\n", verb="validate")
    assert result.code == 2 and "unknown plugin 'text'" in result.err
    from gptflow.manager import load_plugins

    plugins = load_plugins()
    assert "tokenize" in plugins.node_types and "mlflow" not in plugins.trackers


def test_parallel_workers_share_the_cores(run_pipeline, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = run_pipeline("name: t\nnodes:\n  a: {plugin: threads, params: {text: a}}\n"
                          "  b: {plugin: threads, params: {text: b}}\n", "--jobs", "2")
    assert result.code == 0, result.out
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {n["metrics"]["threads"] for n in result.record["nodes"].values()} == {share}
