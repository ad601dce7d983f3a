"""LoRA and QLoRA: exact at init, exact merges, only adapters learn, NF4 error bounds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_BASE

from gptflow.ml.checkpoint import load_any, load_model
from gptflow.ml.config import preset_config
from gptflow.ml.lora import adapter_state_dict, apply_lora, load_adapter, merge_lora
from gptflow.ml.model import GPT
from gptflow.ml.quant import (
    NF4_LEVELS,
    Int4Linear,
    NF4Linear,
    dequantize_nf4,
    quantize_linears_nf4,
    quantize_model,
    quantize_nf4,
)

TARGETS = ["*.q_proj", "*.v_proj", "*.up_proj"]


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(preset_config("tiny", vocab_size=101, n_kv_head=2)).eval()


def test_lora_equals_base_at_initialisation():
    model = tiny()
    x = torch.randint(0, 101, (2, 20))
    before = model(x)
    names = apply_lora(model, TARGETS, rank=4, alpha=8)
    assert len(names) == 6  # 2 layers x 3 patterns
    assert torch.equal(model(x), before)


def test_merge_equals_unmerged_forward_and_unmerge_restores():
    model = tiny()
    apply_lora(model, TARGETS, rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # as after training
    x = torch.randint(0, 101, (2, 20))
    adapted = model(x)
    layer = model.blocks[0].attn.q_proj
    original = layer.base.weight.clone()
    layer.merge()
    assert torch.allclose(model(x), adapted, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, original, atol=1e-6)
    merge_lora(model)
    assert isinstance(model.blocks[0].attn.q_proj, torch.nn.Linear)
    assert torch.allclose(model(x), adapted, atol=1e-5)


def test_only_adapter_parameters_get_gradients():
    model = tiny().train()
    apply_lora(model, TARGETS, rank=4, alpha=8)
    x = torch.randint(0, 101, (2, 20))
    model(x).sum().backward()
    for name, p in model.named_parameters():
        is_adapter = "lora_" in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    share = sum(p.numel() for p in model.parameters() if p.requires_grad) / \
        sum(p.numel() for p in model.parameters())
    assert share < 0.1
    assert set(adapter_state_dict(model)) == {n for n, _ in model.named_parameters()
                                              if "lora_" in n}


def test_adapter_load_checks_keys():
    model = tiny()
    apply_lora(model, TARGETS, rank=4, alpha=8)
    state = adapter_state_dict(model)
    load_adapter(model, state)
    state.popitem()
    with pytest.raises(ValueError, match="adapter does not fit this model: missing"):
        load_adapter(model, state)


@pytest.mark.parametrize("double", [False, True])
def test_nf4_error_bounds_and_size(double):
    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.02
    state = quantize_nf4(w, block=64, double=double)
    back = dequantize_nf4(state)
    rel = (back - w).abs().mean() / w.abs().mean()
    assert rel < 0.11  # NF4 on normal weights: ~9% mean relative error
    blocks = w.flatten().view(-1, 64)
    # the error in a block is at most half the widest gap between levels times its absmax
    half_gap = float(NF4_LEVELS.diff().max()) / 2
    bound = blocks.abs().amax(1, keepdim=True) * half_gap * 1.02
    assert ((back - w).flatten().view(-1, 64).abs() <= bound + 1e-4).all()
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert size <= (0.13 if double else 0.141) * w.numel() * 4


@pytest.mark.parametrize(("shape", "block"), [((96, 64), 64), ((3, 6), 18)])
def test_nf4_dequantizes_each_code_to_its_level_times_its_block_scale(shape, block):
    torch.manual_seed(0)
    state = quantize_nf4(torch.randn(*shape), block=block, double=False)
    assert state["codes"].numel() % 2 == (shape == (3, 6))  # an odd byte count too
    codes = torch.stack([state["codes"] & 0xF, state["codes"] >> 4], dim=-1).flatten()
    expected = (NF4_LEVELS[codes.long()].view(-1, block) * state["absmax"][:, None]).view(shape)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_nf4(state, dtype), expected.to(dtype))


@pytest.mark.parametrize("kind", [NF4Linear, Int4Linear])
def test_qlora_base_trains_adapters_through_4_bits(kind):
    model = tiny().train()
    if kind is NF4Linear:
        quantize_linears_nf4(model)
    else:
        quantize_model(model, "int4", 32)
    assert isinstance(model.blocks[0].mlp.down_proj, kind)
    apply_lora(model, TARGETS, rank=4, alpha=8)
    x = torch.randint(0, 101, (2, 20))
    model(x).sum().backward()
    # B starts at zero, so A gets no gradient yet; B in the first block gets one only
    # if gradients flow back through the NF4 layers of the second
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("quantize", ["nf4", "int4"])
def test_qlora_base_is_quantized_layer_by_layer_as_it_loads(tmp_path, quantize):
    """Loading a QLoRA base never holds its full-precision weights together: when a
    layer's weight arrives, every earlier one has been quantized and freed. The
    result equals quantizing the fully loaded model."""
    import weakref

    from gptflow.ml.adapter import LoraConfig
    from gptflow.ml.checkpoint import load_adapted, save_model
    from gptflow.ml.lora import base_layer, prepare
    from gptflow.ml.tokenizer import Tokenizer

    model = tiny()
    save_model(tmp_path, model.to(torch.bfloat16), Tokenizer.train_char(["abc"]))
    config = LoraConfig(str(tmp_path), "", layers=tuple(TARGETS), quantize_base=quantize)
    quantize_layer = base_layer(config)
    assert quantize_layer is not None
    seen: list[weakref.ref[torch.Tensor]] = []

    def layer(linear: torch.nn.Linear) -> torch.nn.Module:
        assert linear.weight.dtype == torch.bfloat16  # as stored: never widened to fp32
        assert all(ref() is None for ref in seen), "an earlier layer's weight is alive"
        seen.append(weakref.ref(linear.weight))
        return quantize_layer(linear)

    streamed, _ = load_model(tmp_path, linear=layer)
    assert len(seen) == 7 * model.config.n_layer  # q k v o gate up down
    torch.manual_seed(1)
    prepare(streamed, config)
    torch.manual_seed(1)
    whole, _, _ = load_adapted(tmp_path, config)
    reference, _ = load_model(tmp_path)
    torch.manual_seed(1)
    prepare(reference, config)
    expected = reference.state_dict()
    for loaded in (streamed, whole):
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)


def test_frozen_int4_layer_works_by_blocks_of_rows(monkeypatch):
    """A 4-bit layer larger than a block de-quantizes (training) and repacks for the
    kernel (inference) a block of rows at a time, so a 150k-row embedding table is
    never whole in full precision: the results equal the whole weight's."""
    from gptflow.ml import quant

    torch.manual_seed(0)
    layer = Int4Linear(torch.nn.Linear(64, 208, bias=False), 32)
    w = layer.weight()
    x = torch.randn(3, 64, requires_grad=True)
    layer.keep_packed = True  # inference: the kernel
    with torch.no_grad():
        whole = layer(x)  # packed in one go
    monkeypatch.setattr(quant, "ROW_BLOCK_ELEMENTS", 64 * 70)  # rows 70, 70, 68; 64 x 3 + 16
    assert len([*layer.weight_blocks(torch.float32)]) == 3
    layer._packed = None
    with torch.no_grad():
        assert torch.equal(layer(x), whole)  # packed by blocks of 64 rows
    layer.keep_packed = False  # a QLoRA base
    grad = torch.randn(3, 208)
    y = layer(x)  # de-quantized by blocks, in forward and backward
    y.backward(grad)
    assert torch.allclose(y, x.detach() @ w.T, atol=1e-5)
    assert x.grad is not None and torch.allclose(x.grad, grad @ w, atol=1e-5)


@pytest.mark.parametrize("quantize", ["nf4", "int4"])
def test_qlora_int4_embedding_is_the_tied_head_and_adapters_learn(quantize):
    import copy

    from gptflow.ml.adapter import LoraConfig
    from gptflow.ml.lora import prepare
    from gptflow.ml.loss import supervised_loss
    from gptflow.ml.quant import QuantEmbedding, dequantize_model

    model = tiny().train()
    prepare(model, LoraConfig("", "", layers=tuple(TARGETS), quantize_base=quantize,
                              quantize_embeddings=True))
    assert isinstance(model.embed, QuantEmbedding) and model.lm_head is model.embed.table
    assert not [n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n]
    x = torch.randint(0, 101, (2, 20))
    reference = copy.deepcopy(model)
    dequantize_model(reference, (QuantEmbedding,))  # the same int4 values, in fp32
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    supervised_loss(model, x[:, :-1], x[:, 1:]).backward()  # the head through its backward
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_quantize_embeddings_needs_a_4bit_base_and_a_frozen_embedding():
    from gptflow_lora import LoraParams
    from pydantic import ValidationError

    LoraParams(quantize_base="int4", quantize_embeddings=True)
    with pytest.raises(ValidationError, match="quantize_embeddings needs quantize_base"):
        LoraParams(quantize_embeddings=True)
    with pytest.raises(ValidationError, match="trains the embedding"):
        LoraParams(quantize_base="nf4", quantize_embeddings=True, also_train=["embed.*"])


def test_safetensors_read_one_by_one_equals_the_library(tmp_path):
    from safetensors.torch import load_file, save_file

    from gptflow.ml.checkpoint import read_one_by_one

    state = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7),
             "c": torch.zeros(0, 4), "d": torch.tensor([True, False]), "e": torch.tensor(2.5)}
    save_file(state, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    ours = dict(read_one_by_one(tmp_path / "x.safetensors"))
    theirs = load_file(str(tmp_path / "x.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)


LORA_PIPELINE = "name: lora\nnodes:\n" + TINY_BASE + """\
  lora:
    plugin: lora
    inputs: {{model: base}}
    params:
      tasks: ["builtin:sentiment4?n=200&test=40"]
      trainer: {{max_steps: 8}}
      batch_size: 8
      quantize_base: {quantize}
  merged:
    plugin: merge-adapter
    inputs: {{adapter: lora}}
  eval:
    plugin: evaluate
    inputs: {{models: [base, lora, merged]}}
    params: {{tasks: ["builtin:sentiment4?n=200&test=40"], max_instances: 10}}
"""


@pytest.mark.parametrize("quantize", [
    "none", "nf4", "int4",
    pytest.param("nf4\n      quantize_embeddings: true", id="nf4-int4-embedding")])
def test_lora_node_adapter_is_evaluated_and_refused_on_another_base(run_pipeline, review_corpus,
                                                                    quantize, capfd, tmp_path):
    result = run_pipeline(LORA_PIPELINE.format(corpus=review_corpus, quantize=quantize))
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["lora"]["metrics"]
    assert metrics["trainable_share"] < 0.1
    adapter = result.output("lora")
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter.safetensors"}
    assert metrics["bytes_on_disk"] < 0.2 * result.record["nodes"]["base"]["metrics"][
        "bytes_on_disk"]
    rows = json.loads((result.output("eval") / "report.json").read_text())["rows"]
    assert {r["model"] for r in rows} >= {"base", "lora", "merged"}
    adapted, _, _ = load_any(adapter)
    merged, _ = load_model(result.output("merged"))
    x = torch.randint(0, 400, (2, 24))
    with torch.no_grad():  # the merge is exact; int4's kernel computes in bf16
        expected = adapted(x)
        tolerance = 1e-4 if quantize != "int4" else 0.02 * float(expected.abs().max())
        assert torch.allclose(merged(x), expected, atol=tolerance)

    from gptflow.cli import main

    capfd.readouterr()
    assert main(["generate", str(adapter), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    moved = tmp_path / "adapter"  # a copy outside the store, edited (inside: corrupt)
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_fingerprint"] = "0" * 32 + "/model"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", str(moved), "--prompt", "The"]) == 2
    assert "this adapter was trained on base 000" in capfd.readouterr().err


def test_also_train_parameters_are_saved_with_the_adapter():
    model = tiny()
    apply_lora(model, TARGETS, rank=4, alpha=8, also_train=["embed.weight"])
    assert model.embed.weight.requires_grad and not model.norm.weight.requires_grad
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    state = adapter_state_dict(model)
    assert "embed.weight" in state and "lm_head.weight" not in state  # tied: saved once
    fresh = tiny()
    apply_lora(fresh, TARGETS, rank=4, alpha=8, also_train=["embed.weight"])
    load_adapter(fresh, state)
    x = torch.randint(0, 101, (1, 12))
    assert torch.equal(fresh(x), model(x))


def test_weights_take_the_dtype_training_wants():
    """bf16 precision keeps a frozen base in bf16 (half the memory, bf16 kernels) and
    the adapters in fp32 for the optimizer; 32-true puts a bf16-stored model in fp32,
    bf16-true everything in bf16."""
    from gptflow.ml.loss import supervised_loss
    from gptflow.recipes.training import place_weights

    model = tiny()
    x = torch.randint(0, 64, (2, 16))
    reference = supervised_loss(model, x, x)
    apply_lora(model, ["*.q_proj", "*.v_proj"], rank=4, alpha=8)
    place_weights(model, "bf16-mixed")
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert model.get_buffer("rope_cos").dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supervised_loss(model, x, x)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)
    place_weights(model.to(torch.bfloat16), "32-true")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    place_weights(model, "bf16-true")  # trainable ones too: never an fp32 copy first
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
