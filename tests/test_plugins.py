"""The plugin system: registration, lifecycle hooks, documentation, isolation."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from gptflow import NodeType, Params, hookimpl, hookspecs
from gptflow.manager import PluginError, load_plugins

ROOT = Path(__file__).parent.parent


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def before_pipeline_run(self, run_id, pipeline, nodes):
        self.calls.append(("before_pipeline_run", pipeline, tuple(nodes)))

    @hookimpl
    def before_node_run(self, run_id, node, plugin, fingerprint):
        self.calls.append(("before_node_run", node))

    @hookimpl
    def after_node_run(self, run_id, node, status, metrics, outputs):
        self.calls.append(("after_node_run", node, status))

    @hookimpl
    def on_node_error(self, run_id, node, error, log_path):
        self.calls.append(("on_node_error", node, error))

    @hookimpl
    def after_pipeline_run(self, run_id, status, record):
        self.calls.append(("after_pipeline_run", status))


def test_lifecycle_hooks_in_order(tmp_path):
    from rich.console import Console

    from gptflow.console import Display
    from gptflow.session import run_pipeline

    recorder = Recorder()
    plugins = load_plugins(extra=[recorder])
    path = tmp_path / "p.yaml"
    path.write_text("name: h\nnodes:\n  a: {plugin: text}\n"
                    "  b: {plugin: fail, inputs: {after: a}}\n")
    with open(tmp_path / "out.txt", "w") as out, Display(Console(file=out)) as display:
        run_pipeline(path, store=tmp_path / "store", plugins=plugins, display=display)
    assert recorder.calls == [
        ("before_pipeline_run", "h", ("a", "b")),
        ("before_node_run", "a"), ("after_node_run", "a", "ran"),
        ("before_node_run", "b"), ("on_node_error", "b", "boom"),
        ("after_pipeline_run", "failed"),
    ]


def test_duplicate_node_type_names_both_providers():
    class Dup:
        @hookimpl
        def register_node_types(self, register):
            register(NodeType("text", lambda context, inputs, params: None, Params,
                              {"data": "dataset"}))

    with pytest.raises(PluginError, match="'text' is registered twice: by toy_nodes and by"):
        load_plugins(extra=[Dup()])


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def before_node_runn(self, run_id):
            pass

    with pytest.raises(PluginError, match="plugin Typo: @hookimpl 'before_node_runn' is no "
                       "gptflow hook; did you mean 'before_node_run'"):
        load_plugins(extra=[Typo()])


def test_runs_with_no_plugins_at_all(monkeypatch):
    monkeypatch.delenv("GPTFLOW_PLUGINS")
    plugins = load_plugins(builtins=False)
    assert plugins.node_types == {}
    plugins.before_pipeline_run("r", "p", [], "p.yaml", {})  # every hook is a no-op
    assert plugins.training_callbacks("n", "r", {}, "logs") == []
    assert plugins.trackers == {}


def test_training_callbacks_hook():
    marker = object()

    class Adds:
        @hookimpl
        def register_training_callbacks(self, node, register):
            register((node, marker))

    callbacks = load_plugins(extra=[Adds()]).training_callbacks("base", "r", {}, "logs")
    assert callbacks == [("base", marker)]


def test_every_hook_is_documented():
    reference = (ROOT / "docs" / "plugins.md").read_text()
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, "gptflow_spec"):
            doc = inspect.getdoc(fn) or ""
            assert "Args:" in doc and "Returns:" in doc, name
            assert f"### `{name}" in reference, f"{name} missing from docs/plugins.md"


@pytest.mark.parametrize("verb", [["validate", "P"], ["plan", "P"], ["graph", "P"],
                                  ["plugins"], ["schema"], ["--help"]])
def test_light_verbs_import_no_torch(verb, tmp_path):
    (tmp_path / "p.yaml").write_text("name: t\nnodes:\n  a: {plugin: text}\n")
    args = [str(tmp_path / "p.yaml") if a == "P" else a for a in verb]
    code = ("import sys; from gptflow.cli import main\n"
            f"try: main({args!r})\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'lightning' not in sys.modules, 'lightning imported'\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr


def test_schema_and_plugin_help(capsys):
    import json

    from gptflow.cli import main

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    variants = schema["properties"]["nodes"]["additionalProperties"]["oneOf"]
    text = next(v for v in variants if v["properties"]["plugin"]["const"] == "text")
    assert text["properties"]["params"] == {"$ref": "#/$defs/TextParams"}
    text_param = schema["$defs"]["TextParams"]["properties"]["text"]
    assert text_param["description"] == "The text to write."
    assert main(["plugins", "text"]) == 0
    out = capsys.readouterr().out
    assert "The text to write." in out and "toy_nodes" in out


def test_graph_formats(run_pipeline):
    text = "name: g\nnodes:\n  a: {plugin: text}\n  b: {plugin: concat, inputs: {parts: [a]}}\n"
    assert "a -->|data->parts| b" in run_pipeline(text, "--format", "mermaid", verb="graph").out
    assert '"a" -> "b"' in run_pipeline(text, "--format", "dot", verb="graph").out
    assert "b (concat) <- a.data" in run_pipeline(text, verb="graph").out


def test_show_path_runs(run_pipeline, capfd):
    from gptflow.cli import main

    result = run_pipeline("name: s\nnodes:\n  a: {plugin: text}\n")
    store = ["--store", str(result.store.root)]
    assert main(["path", "latest", "a", *store]) == 0
    path = Path(capfd.readouterr().out.strip())
    assert (path / "artifact.json").is_file() and (path / "text.txt").read_text() == "hello"
    assert main(["path", "latest", "a.nope", *store]) == 2
    assert main(["show", "latest", "--json", *store]) == 0
    import json

    record = json.loads(capfd.readouterr().out)
    assert record["nodes"]["a"]["metrics"]["chars"] == 5
    assert main(["show", "nope", *store]) == 2
    assert main(["runs", *store]) == 0


def test_an_observer_that_raises_is_named_and_the_pipeline_goes_on(tmp_path):
    """A notifier whose server is down breaks neither the other observers nor the
    pipeline: every node runs, run.json names plugin and hook, the exit is non-zero."""
    from rich.console import Console

    from gptflow.console import Display
    from gptflow.session import run_pipeline

    class Down:
        @hookimpl
        def after_node_run(self, node):
            raise RuntimeError(f"my notifier is down ({node})")

    recorder = Recorder()
    plugins = load_plugins(extra=[Down(), recorder])
    path = tmp_path / "p.yaml"
    path.write_text("name: h\nnodes:\n  a: {plugin: text}\n"
                    "  b: {plugin: text, params: {text: bye}}\n")
    with open(tmp_path / "out.txt", "w") as out, Display(Console(file=out)) as display:
        record = run_pipeline(path, store=tmp_path / "store", plugins=plugins, display=display)
    assert {n.status for n in record.nodes.values()} == {"ran"}
    assert ("after_node_run", "b", "ran") in recorder.calls  # the other observer still ran
    assert record.warnings[0].endswith(
        "hook after_node_run raised RuntimeError: my notifier is down (a)")
    assert record.warnings[0].startswith("plugin ")
    assert "warning: plugin" in (tmp_path / "out.txt").read_text()
