"""The supervised-positions loss equals cross-entropy over full logits: values
and gradients, in chunks, tied or not, under bf16 autocast, adapted heads."""

from __future__ import annotations

import pytest
import torch

from gptflow.ml import loss
from gptflow.ml.adapter import LoraConfig
from gptflow.ml.config import GPTConfig
from gptflow.ml.lora import prepare
from gptflow.ml.model import GPT

pytestmark = pytest.mark.torch
VOCAB = 3000


def model_and_batch(tie: bool) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context=64, n_layer=2, n_head=2, d_model=32,
                          tie_embeddings=tie))
    x, y = torch.randint(0, VOCAB, (3, 40)), torch.randint(0, VOCAB, (3, 40))
    y[:, :30] = -100  # a prompt
    y[1, 35:] = -100  # padding
    return model, x, y


def grads(model: torch.nn.Module, value: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    value.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [True, False])
def test_equals_full_logits_cross_entropy_in_chunks(tie, monkeypatch):
    model, x, y = model_and_batch(tie)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", VOCAB * 4)  # 4 rows a chunk: 6 chunks
    reference = loss.token_loss(model(x), y)
    expected = grads(model, reference)
    ours = loss.supervised_loss(model, x, y)
    got = grads(model, ours)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got[name], g, atol=1e-6), name


def test_sums_scores_and_bf16_autocast():
    model, x, y = model_and_batch(tie=True)
    with torch.no_grad():
        summed = loss.supervised_loss(model, x, y, reduction="sum")
        each = loss.supervised_loss(model, x, y, reduction="none")
        full = torch.nn.functional.cross_entropy(model(x)[y != -100], y[y != -100],
                                                 reduction="none")
    assert torch.allclose(each, full, atol=1e-5)
    assert summed.item() == pytest.approx(float(full.sum()), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, ours = loss.token_loss(model(x), y), loss.supervised_loss(model, x, y)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-3)
    assert all(g.dtype == torch.float32 for g in grads(model, ours).values())


def test_a_quantized_head_trains_through_its_own_backward():
    model, x, y = model_and_batch(tie=False)  # QLoRA puts an untied head in NF4
    prepare(model, LoraConfig(base_path="", base_fingerprint="", rank=2,
                              layers=("*.q_proj",), quantize_base="nf4"))
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.q_proj.lora_B)
    reference = loss.token_loss(model(x), y)
    expected = grads(model, reference)
    got = grads(model, loss.supervised_loss(model, x, y))
    assert got.keys() == expected.keys() and "blocks.0.attn.q_proj.lora_B" in got
    for name, g in expected.items():
        assert torch.allclose(got[name], g, atol=1e-5), name


def per_example_reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                          ) -> torch.Tensor:
    """The mean over rows of each row's mean cross-entropy, from full logits."""
    rows = [loss.token_loss(model(x[r:r + 1]), y[r:r + 1]) for r in range(len(x))
            if (y[r] != -100).any()]
    return torch.stack(rows).mean()


@pytest.mark.parametrize("head", ["fused", "quantized"])
def test_example_reduction_weighs_every_row_alike(head, monkeypatch):
    """Rows of 10, 5 and 1 targets (and one with none) weigh the same: values and
    gradients equal the mean of per-row means, through the fused head in chunks and
    through a quantized head's own backward."""
    model, x, y = model_and_batch(tie=head == "fused")
    x, y = torch.cat([x, x[:1]]), torch.cat([y, torch.full_like(y[:1], -100)])
    y[2, 31:] = -100  # a one-token answer
    if head == "quantized":
        prepare(model, LoraConfig(base_path="", base_fingerprint="", rank=2,
                                  layers=("*.q_proj",), quantize_base="nf4"))
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", VOCAB * 4)
    reference = per_example_reference(model, x, y)
    expected = grads(model, reference)
    ours = loss.supervised_loss(model, x, y, reduction="example")
    got = grads(model, ours)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert ours.item() != pytest.approx(loss.supervised_loss(model, x, y).item(), rel=1e-3)
    for name, g in expected.items():
        assert torch.allclose(got[name], g, atol=1e-6), name


def test_nothing_supervised_is_nan_as_cross_entropy():
    model, x, y = model_and_batch(tie=True)
    y[:] = -100
    assert torch.isnan(loss.supervised_loss(model, x, y))


SHARED_CASES = {
    "rope-sdpa": {},
    "learned-naive": dict(position="learned", norm="layernorm", mlp="gelu", attention="naive"),
    "gemma-windows": dict(sliding_window=6, layer_types=("sliding_attention", "full_attention"),
                          rope_local_theta=100.0, norm_offset=1.0, embed_scale=True,
                          post_norms=True, mlp="geglu", qk_norm=True, n_kv_head=1),
}


@pytest.mark.parametrize("case", SHARED_CASES)
def test_a_shared_prefix_is_computed_once_with_the_same_loss_and_gradients(case):
    """Rows that begin alike (one task's definition) are packed: the prefix once, each
    row's rest attending to it; values and gradients equal the padded batch's, with
    windows narrower than the prefix and than the rest."""
    model, x, y = model_and_batch(tie=True)
    model = GPT(GPTConfig(**{**model.config.__dict__, **SHARED_CASES[case]}))
    x[:, :20] = x[0, :20]  # a common definition of 20 tokens, then each row's input
    keep = y != -100
    assert loss.shared_prefix(model, x, keep) == 20
    y[2, 12] = 7  # a target at 12: only 12 shared positions remain
    assert loss.shared_prefix(model, x, y != -100) == 12
    with torch.no_grad():
        packed = model.hidden(x, shared=12)
        assert torch.allclose(packed, model.hidden(x)[:, 12:], atol=1e-5)
    expected = grads(model, loss.token_loss(model(x), y))
    value = loss.supervised_loss(model, x, y)
    got = grads(model, value)
    assert value.item() == pytest.approx(loss.token_loss(model(x), y).item(), rel=1e-5)
    for name, g in expected.items():
        assert torch.allclose(got[name], g, atol=1e-5), name


def test_no_sharing_where_it_would_change_training():
    model, x, y = model_and_batch(tie=True)
    x[:, :20] = x[0, :20]
    dropped = GPT(GPTConfig(**{**model.config.__dict__, "dropout": 0.1}))
    assert loss.shared_prefix(dropped, x, y != -100) == 0  # one dropout mask per row
    assert loss.shared_prefix(dropped.eval(), x, y != -100) == 20
    assert loss.shared_prefix(model, x[:1], y[:1] != -100) == 0  # one row
    x[1, 5] += 1
    assert loss.shared_prefix(model, x, y != -100) == 0  # 5 common tokens: too few
