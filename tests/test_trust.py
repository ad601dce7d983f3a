"""Trust (#15): what a node returns and writes is checked the moment it returns,
built-in sources carry a content version, one plugin can be switched off, and
parallel workers share the cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gptflow.store import Store


def misbehave(how: str, after: bool = False) -> str:
    text = "name: m\nnodes:\n  a: {plugin: text}\n"
    inputs = ", inputs: {after: a}" if after else ""
    return text + f"  m: {{plugin: misbehave, params: {{how: {how}}}{inputs}}}\n"


@pytest.mark.torch
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


@pytest.mark.torch
def test_parallel_workers_share_the_cores(run_pipeline, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = run_pipeline("name: t\nnodes:\n  a: {plugin: threads, params: {text: a}}\n"
                          "  b: {plugin: threads, params: {text: b}}\n", "--jobs", "2")
    assert result.code == 0, result.out
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {n["metrics"]["threads"] for n in result.record["nodes"].values()} == {share}


def node_type_plugin(**changes):
    from gptflow import NodeType, Params, hookimpl

    class Good(Params):
        x: int = 1

    fields = {"name": "odd", "run": lambda context, inputs, params: None, "params": Good,
              "outputs": {"data": "dataset"}, **changes}

    class Author:
        @hookimpl
        def register_node_types(self, register):
            register(NodeType(**fields))

    return Author()


class LaxParams(__import__("pydantic").BaseModel):
    x: int = 1


@pytest.mark.parametrize(("changes", "expected"), [
    ({"inputs": {"x": "dataset"}}, "input 'x' must be a gptflow.Input(...), got 'dataset'"),
    ({"version": 2}, "version must be a string, got 2"),
    ({"params": LaxParams}, "params model LaxParams lets unknown keys through"),
    ({"params": dict}, "params must be a pydantic model"),
    ({"run": lambda context: None}, "run must be a function of (context, inputs, params)"),
])
def test_registration_refuses_what_would_fail_later(changes, expected):
    from gptflow.manager import PluginError, load_plugins

    with pytest.raises(PluginError) as e:
        load_plugins(extra=[node_type_plugin(**changes)])
    message = str(e.value)
    assert message.startswith("plugin Author (") and "node type 'odd'" in message
    assert expected in message, message


def test_a_hook_without_hookimpl_is_named():
    from gptflow.manager import PluginError, load_plugins

    class Forgetful:
        def after_node_run(self, **kwargs):
            pass

    with pytest.raises(PluginError, match=r"plugin Forgetful: after_node_run\(\) is not marked "
                                          "@hookimpl"):
        load_plugins(extra=[Forgetful()])


def test_broken_and_duplicate_entry_points_name_their_distributions(monkeypatch, run_pipeline):
    from types import SimpleNamespace

    from gptflow.manager import PluginError, load_plugins

    def entry_points(dists, value="gptflow_no_such_module"):
        return lambda group: [SimpleNamespace(name="brokn", value=value, dist=SimpleNamespace(
            name=d), load=lambda: __import__(value)) for d in dists]

    monkeypatch.delenv("GPTFLOW_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setattr("importlib.metadata.entry_points", entry_points(["gptflow-brokn"]))
    with pytest.raises(PluginError, match=r"plugin brokn \(distribution gptflow-brokn, entry "
                       r"point gptflow_no_such_module\) cannot be imported: "
                       r"ModuleNotFoundError.*GPTFLOW_DISABLE_PLUGINS=brokn skips it"):
        load_plugins()
    result = run_pipeline("name: t\nnodes:\n  a: {plugin: text}\n", verb="validate")
    assert result.code == 2 and "cannot be imported" in result.err  # every verb says so
    monkeypatch.setenv("GPTFLOW_DISABLE_PLUGINS", "brokn")
    assert run_pipeline("name: t\nnodes:\n  a: {plugin: text}\n", verb="validate").code == 0
    monkeypatch.delenv("GPTFLOW_DISABLE_PLUGINS")
    monkeypatch.setattr("importlib.metadata.entry_points", entry_points(["one", "two"]))
    with pytest.raises(PluginError, match="'brokn' is claimed by two distributions, one and two"):
        load_plugins()


@pytest.mark.torch
def test_plugins_lists_hook_only_plugins_and_warns_of_torch_at_load():
    import subprocess
    import sys

    from conftest import TESTS

    env = {**os.environ, "GPTFLOW_PLUGINS": "toy_nodes,heavy_plugin", "COLUMNS": "200",
           "PYTHONPATH": str(TESTS)}
    out = subprocess.run([sys.executable, "-m", "gptflow.cli", "plugins"], env=env,
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if "heavy_plugin" in line and "│" in line)
    assert "after_node_run" in row
    assert "warning: plugin heavy_plugin imports torch when loaded" in out
    assert "warning: plugin toy_nodes" not in out


CHAIN = ("name: c\nnodes:\n  a: {plugin: text}\n  b: {plugin: concat, inputs: {parts: [a]}}\n"
         "  c: {plugin: concat, inputs: {parts: [a, b]}}\n")


def test_downstream_follows_upstream_content_with_early_cutoff(run_pipeline, monkeypatch):
    first = run_pipeline(CHAIN)
    assert first.code == 0
    same = run_pipeline(CHAIN, "--force", "a")  # re-run, identical bytes: nothing below
    statuses = {n: e["status"] for n, e in same.record["nodes"].items()}
    assert statuses == {"a": "ran", "b": "cached", "c": "cached"}
    assert "its inputs came out unchanged" in same.record["nodes"]["b"]["reason"]
    plan = run_pipeline(CHAIN, "--force", "a", "--dry-run")
    assert "after a: cached if" in " ".join(plan.out.split())
    monkeypatch.setenv("TOY_SUFFIX", "!")  # a code change without a version bump
    changed = run_pipeline(CHAIN, "--force", "a")
    statuses = {n: e["status"] for n, e in changed.record["nodes"].items()}
    assert statuses == {"a": "ran", "b": "ran", "c": "ran"}
    assert changed.record["nodes"]["b"]["reason"] == "upstream changed: parts"
    assert (changed.output("c") / "text.txt").read_text() == "hello!+hello!"
    assert run_pipeline(CHAIN).record["nodes"]["c"]["status"] == "cached"


CLEAN = "name: clean\nnodes:\n  r: {plugin: read, params: {path: corpus.txt}}\n"


def test_relative_paths_start_at_the_pipeline_files_folder(tmp_path, monkeypatch, capfd):
    from gptflow.cli import main
    from gptflow.session import Session

    for project in ("one", "two"):
        demo = tmp_path / project / "demo"
        demo.mkdir(parents=True)
        (demo / "clean.yaml").write_text(CLEAN)
        (demo / "corpus.txt").write_text("the corpus beside the pipeline")
    monkeypatch.chdir(tmp_path / "one")  # the parent of the pipeline's folder
    assert main(["run", "demo/clean.yaml"]) == 0
    store = Store(tmp_path / "one" / ".gptflow")
    record = store.load_run(store.resolve_run("latest"))
    out = Path(record.nodes["r"].outputs["data"]) / "text.txt"
    assert out.read_text() == "the corpus beside the pipeline"
    # the same project elsewhere: the same fingerprints
    prints = [Session.load(tmp_path / p / "demo" / "clean.yaml").plan()[0].fingerprint
              for p in ("one", "two")]
    assert prints[0] == prints[1]
    (tmp_path / "one" / "demo" / "corpus.txt").unlink()
    capfd.readouterr()
    assert main(["validate", "demo/clean.yaml"]) == 2
    assert f"no such file or folder: 'corpus.txt' in {tmp_path / 'one' / 'demo'}" in \
        capfd.readouterr().err


def test_package_files_are_fingerprinted_by_content_under_their_package_name(tmp_path):
    """package:NAME/PATH: the same file in another environment is the same input."""
    from gptflow.session import Session

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nnodes:\n  t: {plugin: tokenize, params: "
                    "{corpus: ['package:gptflow/errors.py'], vocab_size: 300}}\n")
    (step,) = Session.load(path, store=tmp_path / "s").plan()
    (named,) = step.manifest["files"]["package:gptflow/errors.py"]
    assert named == "package:gptflow/errors.py"
