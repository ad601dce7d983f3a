"""The GPT decoder: every switch, attention paths, KV cache, checkpoints."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from gptflow.ml.checkpoint import ModelLoadError, load_model, save_model
from gptflow.ml.config import preset_config
from gptflow.ml.generate import generate, sample_batch
from gptflow.ml.model import GPT, KVCache
from gptflow.ml.tokenizer import Tokenizer

SWITCHES = list(itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"],
                                  ["gelu", "swiglu", "geglu"], ["sdpa", "naive"]))


def tiny(**overrides):
    torch.manual_seed(0)
    return GPT(preset_config("tiny", vocab_size=97, **overrides))


@pytest.mark.parametrize(("position", "norm", "mlp", "attention"), SWITCHES)
def test_every_switch_combination_trains_a_step(position, norm, mlp, attention):
    model = tiny(position=position, norm=norm, mlp=mlp, attention=attention, n_kv_head=2)
    x = torch.randint(0, 97, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert abs(losses[0] - math.log(97)) < 0.5  # a fresh model is near-uniform


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_sdpa_equals_naive(n_kv_head, position):
    model = tiny(n_kv_head=n_kv_head, position=position).eval()
    x = torch.randint(0, 97, (3, 40))
    fused = model(x)
    object.__setattr__(model.config, "attention", "naive")
    assert torch.allclose(fused, model(x), atol=1e-5)


@pytest.mark.parametrize("amx", [False, True])
def test_half_precision_attention_on_a_cpu_without_amx_computes_in_fp32(monkeypatch, amx):
    from gptflow.ml import model as model_module

    monkeypatch.setattr(model_module, "cpu_has_amx", lambda: amx)
    attention = tiny(n_kv_head=2).blocks[0].attn
    q, k, v = (torch.randn(2, heads, 40, 16, dtype=torch.bfloat16) for heads in (4, 2, 2))
    wide = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16-mixed training runs it
        y = attention.attend(q, k, v, 0, None)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, wide) != amx  # with AMX: bf16's own kernel


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_equals_full_recompute(position):
    model = tiny(position=position, n_kv_head=2).eval()
    prompt = [5, 17, 42, 8]
    cached = generate(model, prompt, max_new_tokens=20, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]


GEMMA_LIKE = dict(sliding_window=5, layer_types=("sliding_attention", "full_attention"),
                  rope_local_theta=100.0, norm_offset=1.0, embed_scale=True, post_norms=True,
                  mlp="geglu", qk_norm=True, query_pre_attn_scalar=10.0, n_kv_head=2)


def test_sliding_window_sees_only_the_latest_keys():
    """Sliding layers attend to the last ``window`` positions: sdpa equals the naive
    reference with the same mask, a cached prompt continued token by token equals
    the full forward, and a key outside every window changes nothing it cannot see."""
    model = tiny(**GEMMA_LIKE).eval()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        fused = model(x)
        object.__setattr__(model.config, "attention", "naive")
        assert torch.allclose(fused, model(x), atol=1e-5)
        object.__setattr__(model.config, "attention", "sdpa")
        cache = KVCache(model.config, 2, 24, torch.device("cpu"), torch.float32)
        steps = [model(x[:, :10], cache=cache)] + [
            model(x[:, t:t + 1], cache=cache, start=t) for t in range(10, 24)]
        assert torch.allclose(torch.cat(steps, dim=1), fused, atol=1e-5)
    one_layer = tiny(**{**GEMMA_LIKE, "n_layer": 1, "layer_types": None}).eval()
    y = x.clone()
    y[:, 0] = (x[:, 0] + 1) % 97  # only positions 0..4 see position 0
    with torch.no_grad():
        assert torch.allclose(one_layer(x)[:, 5:], one_layer(y)[:, 5:])
        assert not torch.allclose(one_layer(x)[:, :5], one_layer(y)[:, :5])


def test_sampling_is_seeded_and_filters():
    model = tiny().eval()
    a = generate(model, [1, 2], 15, temperature=1.0, top_k=5, seed=3)
    b = generate(model, [1, 2], 15, temperature=1.0, top_k=5, seed=3)
    assert a == b
    assert generate(model, [1, 2], 15, temperature=1.0, top_p=1e-9, seed=4) == \
        generate(model, [1, 2], 15, temperature=0)  # top-p that tiny keeps only the argmax


def test_draw_follows_the_distribution_and_never_picks_zero_probability():
    from gptflow.ml.generate import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    tokens = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq[1] == 0 and torch.allclose(freq, probs[0], atol=0.015)


def test_batched_samples_and_long_prompts():
    from gptflow.ml.generate import sample

    model = tiny().eval()  # context 64
    rows = sample(model, [3, 4, 5], 4, 10, temperature=1.0, seed=1)
    assert len(rows) == 4 and all(len(r) == 10 for r in rows) and len(set(map(tuple, rows))) > 1
    assert sample(model, [3, 4, 5], 1, 10, temperature=1.0, seed=1)[0] == \
        generate(model, [3, 4, 5], 10, temperature=1.0, seed=1)
    long_prompt = [n % 90 for n in range(100)]  # longer than the context: room for the answer
    assert len(generate(model, long_prompt, 20, temperature=0)) == 20
    assert len(generate(model, long_prompt, 500, temperature=0)) == 32  # at most half


def test_end_tokens_stop_a_row_and_stay_in_it():
    model = tiny().eval()
    free = generate(model, [3, 4, 5], 12, temperature=0)
    end = free[5]
    cut = generate(model, [3, 4, 5], 12, temperature=0, ends={end})
    assert cut == free[:free.index(end) + 1]  # kept: it may hold the answer's last characters
    stopped = generate(model, [3, 4, 5], 12, temperature=0, stop_id=end, ends={end})
    assert stopped == free[:free.index(end)]  # a stop token is never kept
    tokenizer = Tokenizer.train_char(["one line\nanother"])
    assert {tokenizer.decode([i]) for i in tokenizer.line_breaks} == {"\n"}


def test_scaled_residual_init_and_tied_head():
    model = GPT(preset_config("nano", vocab_size=300, n_layer=8))
    std = model.blocks[0].attn.o_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.embed.weight


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    tokenizer = Tokenizer.train_char(["hello world, a tiny corpus"])
    for tied in (True, False):
        model = GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size, n_kv_head=2,
                                  tie_embeddings=tied)).eval()
        folder = tmp_path / f"m{tied}"
        save_model(folder, model, tokenizer)
        loaded, loaded_tok = load_model(folder)
        x = torch.randint(0, tokenizer.vocab_size, (2, 16))
        assert torch.equal(model(x), loaded(x))
        assert loaded_tok.encode("hello") == tokenizer.encode("hello")


def test_load_names_shape_mismatch(tmp_path):
    tokenizer = Tokenizer.train_char(["abc"])
    save_model(tmp_path, GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size)), tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_model"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"embed.weight has shape \(\d+, 64\), config.json "
                                             r"implies \(\d+, 32\)"):
        load_model(tmp_path)


def test_a_config_claiming_a_million_layers_is_refused_before_any_is_built(tmp_path):
    import time

    tokenizer = Tokenizer.train_char(["abc"])
    save_model(tmp_path, GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size)), tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"] = 10**6
    (tmp_path / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"config\.json claims 1,000,000 layers; the "
                                             r"tensors hold 2"):
        load_model(tmp_path)
    assert time.perf_counter() - started < 1


def test_bad_config_is_clear():
    with pytest.raises(ValueError, match=r"n_head \(4\) must be divisible by n_kv_head \(3\)"):
        preset_config("tiny", n_kv_head=3)


def test_activation_checkpointing_recomputes_the_same_gradients():
    """Recomputing each block in the backward pass (dropout included: its random
    state is replayed) gives the gradients of keeping its activations, exactly."""
    from gptflow.ml.loss import supervised_loss

    x = torch.randint(0, 97, (2, 24))
    grads = []
    for recompute in (False, True):
        model = tiny(dropout=0.1).train()
        model.recompute_blocks = recompute
        torch.manual_seed(1)
        supervised_loss(model, x, x).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("overrides", [{}, GEMMA_LIKE, {"position": "learned"}],
                         ids=["rope", "sliding-windows", "learned-positions"])
def test_prompts_of_different_lengths_decode_together_as_each_alone(overrides):
    """Left padding hidden from attention: every row of a batch gets the tokens and
    (up to rounding) the logits it gets alone, at greedy and seeded sampling alike."""
    model = tiny(**overrides).eval()
    torch.manual_seed(1)
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (3, 11, 7, 1)]
    alone = [generate(model, p, 12, temperature=0) for p in prompts]
    assert sample_batch(model, prompts, 12, temperature=0) == alone
    if model.pos_embed is None:  # one padded forward: the same last logits as alone
        real = torch.tensor([[j >= 11 - len(p) for j in range(11)] for p in prompts])
        padded = torch.tensor([[0] * (11 - len(p)) + p for p in prompts])
        with torch.no_grad():
            batch = model(padded, real=real)[:, -1]
            for row, p in enumerate(prompts):
                assert torch.allclose(batch[row], model(torch.tensor([p]))[0, -1], atol=1e-4)
    stop = alone[1][4]  # rows stop at their own stop token, the others go on
    assert sample_batch(model, prompts, 12, temperature=0, stop_id=stop) == [
        generate(model, p, 12, temperature=0, stop_id=stop) for p in prompts]


def test_rope_tables_grow_with_use_and_a_claimed_context_costs_nothing(monkeypatch):
    """Tables cover the positions used so far, growing on demand with the same values
    a full-length table holds; a 2^26-token context a file claims allocates none."""
    import time

    from gptflow.ml import model as module

    torch.manual_seed(0)
    full = tiny(context=256, rope_local_theta=None)
    monkeypatch.setattr(module, "ROPE_START", 16)
    grown = GPT(full.config)
    grown.load_state_dict(full.state_dict())
    assert len(grown.get_buffer("rope_cos")) == 16 < len(full.get_buffer("rope_cos"))
    idx = torch.randint(0, 97, (2, 200))
    with torch.no_grad():
        assert torch.equal(grown(idx), full(idx))
    assert len(grown.get_buffer("rope_cos")) == 200
    monkeypatch.undo()
    started = time.perf_counter()
    huge = GPT(preset_config("tiny", vocab_size=97, context=1 << 26))
    assert time.perf_counter() - started < 2
    assert len(huge.get_buffer("rope_cos")) == module.ROPE_START
