"""The seams between the layers: one source for each truth, the one registry of
built-in sources, one training report for every training node, registration
through pluggy."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
from conftest import TINY_BASE

from gptflow import NodeType, Params, hookimpl
from gptflow.manager import PluginError, load_plugins
from gptflow.ml.adapter import LoraConfig
from gptflow.ml.config import GPTConfig
from gptflow.ml.optim import Optim
from gptflow.recipes import sources
from gptflow.recipes.params import ModelParams, OptimParams
from gptflow.recipes.report import REPORT_KEYS
from gptflow.sources import BUILTINS


def test_model_params_are_the_gpt_config_fields():
    config = {f.name: f for f in dataclasses.fields(GPTConfig)}
    params = dict(ModelParams.model_fields)
    assert set(params) - {"preset"} == set(config) - {"vocab_size"}  # vocab: the tokenizer's
    hints = typing.get_type_hints(GPTConfig)
    for name, info in params.items():
        if name != "preset":
            assert info.default is None, name  # unset fields keep the preset's value
            assert info.annotation == hints[name] | None, name


def test_optim_params_build_the_library_optim():
    assert OptimParams().config() == Optim()
    assert set(OptimParams.model_fields) == {f.name for f in dataclasses.fields(Optim)}


def test_lora_params_defaults_are_the_adapter_config_defaults():
    from gptflow_lora import LoraParams

    p, c = LoraParams(), LoraConfig("", "")
    assert (p.rank, p.alpha, p.dropout, tuple(p.layers), p.quantize_base, p.nf4_block,
            p.double_quant, p.quantize_embeddings) == (
        c.rank, c.alpha, c.dropout, c.layers, c.quantize_base, c.nf4_block, c.double_quant,
        c.quantize_embeddings)


def test_every_builtin_source_has_an_implementation():
    kinds = {"corpus": sources.CORPORA, "tasks": sources.TASKS}
    for name, builtin in BUILTINS.items():
        if builtin.kind in kinds:
            assert name in kinds[builtin.kind], name
    for kind, implemented in kinds.items():
        assert set(implemented) <= {n for n, b in BUILTINS.items() if b.kind == kind}


@pytest.mark.parametrize(("params", "expected"), [
    ("{corpus: ['builtin:revews']}",
     r"pipeline\.yaml:4:\d+: error: unknown built-in source 'builtin:revews'; "
     r"did you mean 'reviews'\?"),
    ("{corpus: ['builtin:sentiment4']}", r"unknown built-in source 'builtin:sentiment4'"),
    ("{corpus: ['builtin:reviews?n=3']}", r"builtin:reviews takes no options"),
])
def test_a_misspelled_builtin_fails_validation(run_pipeline, params, expected):
    text = f"name: t\nnodes:\n  tok:\n    {{plugin: tokenize, params: {params}}}\n"
    result = run_pipeline(text, verb="validate")
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert re.search(expected, result.err), result.err


TRAINING = """\
  sft:
    plugin: instruction-finetune
    inputs: {{model: base}}
    params: {{tasks: ["{tasks}"], trainer: {{max_steps: 3}}, batch_size: 4}}
  lora:
    plugin: lora
    inputs: {{model: base}}
    params: {{tasks: ["{tasks}"], trainer: {{max_steps: 3}}, batch_size: 4, rank: 2}}
  qlora:
    plugin: lora
    inputs: {{model: base}}
    params: {{tasks: ["{tasks}"], trainer: {{max_steps: 3}}, batch_size: 4, rank: 2,
             quantize_base: nf4, nf4_block: 16}}
  kd_tokens:
    plugin: distill
    inputs: {{teacher: base, tokens: tok.tokens}}
    params: {{model: {{preset: tiny, d_model: 32, n_head: 2, context: 96}},
             trainer: {{max_steps: 3}}, batch_size: 4}}
  kd_tasks:
    plugin: distill
    inputs: {{teacher: base}}
    params: {{tasks: ["{tasks}"], model: {{preset: tiny, d_model: 32, n_head: 2, context: 96}},
             trainer: {{max_steps: 3, peak_tflops: 1.0}}, batch_size: 4}}
"""


def test_every_training_node_reports_the_training_report(run_pipeline, review_corpus):
    tasks = "builtin:sentiment4?n=60&test=10"
    text = ("name: report\nnodes:\n" + TINY_BASE.format(corpus=review_corpus)
            + TRAINING.format(tasks=tasks))
    result = run_pipeline(text)
    assert result.code == 0, result.out + result.err
    nodes = result.record["nodes"]
    training = [n for n, e in nodes.items() if e["plugin"] in
                ("pretrain", "instruction-finetune", "lora", "distill")]
    assert len(training) == 6
    for name in training:
        metrics = nodes[name]["metrics"]
        missing = [k for k in REPORT_KEYS if k not in metrics]
        assert not missing, (name, missing)
        assert metrics["steps"] >= 3 and metrics["tokens"] > 0, name
        assert metrics["flops"] == 6 * metrics["params"] * metrics["tokens"], name
        assert metrics["chinchilla_tokens"] == 20 * metrics["params"], name
        assert metrics["mfu"] > 0 and metrics["tokens_per_s"] > 0, name
    assert nodes["kd_tasks"]["metrics"]["peak_source"] == "stated in trainer.peak_tflops"
    assert nodes["kd_tasks"]["metrics"]["peak_flops"] == 1e12
    assert nodes["lora"]["metrics"]["trainable_params"] < nodes["sft"]["metrics"][
        "trainable_params"]


def test_a_registration_hook_that_raises_is_named():
    class Broken:
        @hookimpl
        def register_node_types(self, register):
            raise RuntimeError("oops")

    with pytest.raises(PluginError, match=r"plugin .*: hook register_node_types raised "
                                          r"RuntimeError: oops"):
        load_plugins(extra=[Broken()])


def test_registration_goes_through_pluggy_and_keeps_provenance(monkeypatch, capsys):
    class Extra:
        @hookimpl
        def register_node_types(self, register):
            register(NodeType("extra", lambda context, inputs, params: None, Params,
                              {"out": "report"}))

    monkeypatch.setenv("GPTFLOW_TRACE_HOOKS", "1")
    plugins = load_plugins(extra=[Extra()])
    assert plugins.node_types["extra"].provider == __name__
    assert plugins.node_types["tokenize"].provider == "gptflow"
    assert "register_node_types" in capsys.readouterr().err  # hook tracing sees it


def test_lora_adapter_does_not_depend_on_what_ran_before(tmp_path, review_corpus):
    """The adapters' initial weights come from the node's seed, not from whatever the
    process's random state was (the training report's CPU peak measurement used to
    shift it)."""
    import hashlib
    from pathlib import Path

    import torch

    from gptflow.session import run_pipeline

    text = ("name: lora-seed\nnodes:\n" + TINY_BASE.format(corpus=review_corpus) + """\
  lora:
    plugin: lora
    inputs: {model: base}
    params: {tasks: ["builtin:sentiment4?n=60&test=10"], trainer: {max_steps: 2},
             batch_size: 4, rank: 2}
""")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    digests = []
    for force in (None, ["lora"]):  # after pretraining ran; then with the base cached
        torch.rand(1000)  # and whatever else the process did before
        record = run_pipeline(path, store=tmp_path / "store", force=force)
        adapter = Path(record.nodes["lora"].outputs["adapter"]) / "adapter.safetensors"
        digests.append(hashlib.sha256(adapter.read_bytes()).hexdigest())
    assert record.nodes["base"].status == "cached"
    assert digests[0] == digests[1]
