"""Weight-only quantization: error bounds, kernels, artifacts that round-trip."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BASE

from gptflow.ml.checkpoint import load_any, load_model, save_model
from gptflow.ml.config import preset_config
from gptflow.ml.inference import DecodeLinear, nf4_compute_dtype
from gptflow.ml.model import GPT
from gptflow.ml.quant import (
    Int4Linear,
    Int8Linear,
    LowRankCorrected,
    NF4Linear,
    correct_low_rank,
    quantize_model,
)
from gptflow.ml.tokenizer import Tokenizer


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(256, 96)


def test_int8_error_is_at_most_half_a_step_per_channel(linear):
    q = Int8Linear(linear)
    err = (q.weight() - linear.weight).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()
    assert q.qweight.dtype == torch.int8


def test_int4_error_is_at_most_half_a_step_per_group(linear):
    """An asymmetric grid over each group's [min, max], as GGUF's Q4_1."""
    q = Int4Linear(linear, group_size=64)
    err = (q.weight() - linear.weight).abs().view(96, -1, 64)
    assert (err <= q.scales.float()[..., None] * 0.52).all()  # fp16 scales and lows
    assert q.qweight.numel() == linear.weight.numel() // 2  # two codes per byte


@pytest.mark.parametrize("make", [Int8Linear, partial(Int8Linear, dynamic=True), Int4Linear],
                         ids=["int8", "int8-dynamic", "int4"])
def test_cpu_kernels_match_the_dequantized_weight(linear, make):
    q = make(linear)
    x = torch.randn(2, 7, 256)
    expected = F.linear(x, q.weight(), linear.bias)
    assert torch.allclose(q(x), expected, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize(("method", "embeddings", "tied", "rank"),
                         [("int8", False, True, 0), ("int4", False, True, 0),
                          ("nf4", False, True, 0), ("int8", True, True, 0),
                          ("int4", True, False, 0), ("int8-dynamic", True, True, 0),
                          ("int4", True, False, 4), ("nf4", False, True, 4),
                          ("int8-dynamic", False, True, 4), ("bf16", False, True, 0),
                          ("bf16", False, False, 0)])
def test_quantized_artifact_round_trips(tmp_path, method, embeddings, tied, rank):
    tokenizer = Tokenizer.train_char(["quantized models are small"])
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size,
                              tie_embeddings=tied)).eval()
    full = save_model(tmp_path / "full", model, tokenizer)
    x = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(x)
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_model(model, method, 32, embeddings=embeddings)
    if rank:
        assert correct_low_rank(model, rank, originals) == 14 + (not tied)  # 7 a block, head
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 0.25 * before.abs().max()  # close, not garbage
    size = save_model(tmp_path / "q", model, tokenizer, quantization={
        "method": method, "group_size": 32, "embeddings": embeddings, "correction_rank": rank})
    assert size < full
    loaded, _ = load_model(tmp_path / "q")
    x = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        served = load_any(tmp_path / "q", inference=True)[0]  # as evaluate and generate
        assert not any(isinstance(m, NF4Linear) for m in served.modules())
        if method == "nf4":  # de-quantized into the dtype NF4 computes in here
            assert {m.weight_t.dtype for m in served.modules() if isinstance(m, DecodeLinear)
                    and m is not served.lm_head} == {nf4_compute_dtype(torch.device("cpu"))}
        # served int4 runs PyTorch's kernel on bf16 activations, unserved it de-quantizes;
        # served NF4 computes in bf16 where the CPU has bf16 instructions
        tolerance = 5e-3 if method in ("int4", "nf4", "bf16") else 1e-5
        assert torch.allclose(served(x), model(x), atol=tolerance)


def test_quantize_node_then_evaluate_and_generate(run_pipeline, review_corpus, capfd):
    result = run_pipeline("name: q\nnodes:\n" + TINY_BASE.format(corpus=review_corpus) + """\
  int4:
    plugin: quantize
    inputs: {model: base}
    params: {method: int4}
  eval:
    plugin: evaluate
    inputs: {models: [base, int4], tokens: tok.tokens}
""")
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["int4"]["metrics"]
    assert metrics["bytes_ratio"] < 0.6 and metrics["quantized_layers"] == 14
    config = json.loads((result.output("int4") / "config.json").read_text())
    assert config["quantization"] == {"method": "int4", "group_size": 32, "embeddings": False,
                                      "correction_rank": 0}
    rows = json.loads((result.output("eval") / "report.json").read_text())["rows"]
    ppl = {r["model"]: r["value"] for r in rows if r["metric"] == "perplexity"}
    assert ppl["int4"] < ppl["base"] * 1.2  # close to the model it came from

    from gptflow.cli import main

    capfd.readouterr()
    assert main(["generate", str(result.output("int4")), "--prompt", "The",
                 "--max-new-tokens", "5"]) == 0


def test_bf16_takes_neither_embeddings_nor_a_correction():
    from gptflow_quantize import QuantizeParams
    from pydantic import ValidationError

    for extra in ({"embeddings": True}, {"correction_rank": 4}):
        with pytest.raises(ValidationError, match="bf16 casts every weight"):
            QuantizeParams(method="bf16", **extra)


def test_int4_at_group_32_keeps_a_q4_1_grid_exactly():
    """A model read from a Q4_1 GGUF (16 levels over each block of 32's own range,
    fp16 scale and low) is quantized to int4 without a second rounding."""
    torch.manual_seed(0)
    scale = (torch.rand(64, 8, 1) / 10).half().float()
    low = (-torch.rand(64, 8, 1) / 2).half().float()
    codes = torch.randint(0, 16, (64, 8, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each block spans its whole grid, as Q4_1's do
    linear = torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = (codes * scale + low).view(64, 256)
    q = Int4Linear(linear, group_size=32)
    assert torch.equal(q.weight(), linear.weight.data)


def test_a_low_rank_correction_keeps_a_change_smaller_than_a_step():
    """A fine-tune of a 4-bit model moves its weights by less than a step of the
    grid: int4 alone rounds the change away, a correction of its rank keeps it."""
    torch.manual_seed(0)
    scale = (torch.rand(64, 8, 1) / 10 + 0.05).half().float()
    low = (-torch.rand(64, 8, 1) / 2).half().float()
    codes = torch.randint(1, 15, (64, 8, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    base = (codes * scale + low).view(64, 256)
    change = torch.randn(64, 3) @ torch.randn(3, 256)
    change *= 0.01 / change.abs().max()  # at most a fifth of the smallest step
    linear = torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = base + change
    q = Int4Linear(linear, group_size=32)
    linear_base = torch.nn.Linear(256, 64, bias=False)
    linear_base.weight.data = base
    assert torch.equal(q.qweight, Int4Linear(linear_base).qweight)  # every code the base's
    assert (q.weight() - linear.weight).norm() > 0.7 * change.norm()  # the change is lost
    error = linear.weight.data - q.weight()
    corrected = LowRankCorrected(q, 3, error)
    left = (corrected.weight() - linear.weight).norm()
    assert left < 0.5 * error.norm()
    best = torch.linalg.svdvals(error)[3:].norm()  # the best a rank-3 correction can leave
    assert best <= left < 1.01 * best  # fp16 factors
    x = torch.randn(5, 256)
    assert torch.allclose(corrected(x), x @ corrected.weight().T, atol=1e-5)
