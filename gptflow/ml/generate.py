"""Sampling with a KV cache: temperature, top-k, top-p, seed, stop at end-of-text."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from gptflow.ml.model import GPT, KVCache


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the k most likely tokens and the smallest set whose mass reaches p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # always keep the first
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row by inverse CDF: a cumulative sum and a binary search
    (torch.multinomial spends about a millisecond per call on a 32k vocabulary)."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.size(-1) - 1)


def generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_id: int | None = None, ends: Collection[int] = ()) -> list[int]:
    """Continue ``prompt``; returns only the new tokens (without the stop token;
    with a token of ``ends``, which also stops it).

    ``temperature=0`` is greedy decoding.
    """
    return sample(model, prompt, 1, max_new_tokens, temperature, top_k, top_p, seed, stop_id,
                  ends)[0]


def sample(model: GPT, prompt: Sequence[int], n: int, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, stop_id: int | None = None, ends: Collection[int] = ()
           ) -> list[list[int]]:
    """``n`` continuations of one prompt, decoded together as a batch (the prompt
    is encoded once per row); each ends at its stop token, or after a token of
    ``ends`` (kept: a newline token may hold the answer's last characters)."""
    return sample_batch(model, [prompt] * n, max_new_tokens, temperature, top_k, top_p, seed,
                        stop_id, ends)


@torch.inference_mode()
def sample_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop_id: int | None = None, ends: Collection[int] = ()) -> list[list[int]]:
    """A continuation of each prompt, decoded together as one batch: at batch 1 a
    CPU reads every weight for a token's few FLOPs, so eight rows cost little more
    than one. Prompts of different lengths are left-padded, the padding hidden from
    attention; RoPE sees only relative positions, so each row decodes as it would
    alone (learned positions are absolute: such a model decodes prompt by prompt)."""
    if model.pos_embed is not None and len({len(p) for p in prompts}) > 1:
        return [row for p in prompts for row in sample_batch(
            model, [p], max_new_tokens, temperature, top_k, top_p, seed, stop_id, ends)]
    cfg = model.config
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    # a prompt too long for the context loses its oldest tokens, as in training,
    # leaving room for the new ones (up to half the context)
    room = max(1, min(max_new_tokens, cfg.context // 2))
    rows = [list(p)[-(cfg.context - room):] or [stop_id or 0] for p in prompts]
    length = max(len(p) for p in rows)
    max_new_tokens = min(max_new_tokens, cfg.context - length)
    n = len(rows)
    idx = torch.tensor([[0] * (length - len(p)) + p for p in rows], device=device)
    pads = torch.tensor([length - len(p) for p in rows], device=device)
    real = None if not pads.any() else \
        torch.arange(length + max_new_tokens, device=device)[None] >= pads[:, None]
    cache = KVCache(cfg, n, length + max_new_tokens, device, next(model.parameters()).dtype)
    logits = model(idx, cache=cache, start=0, last_only=True, real=real)[:, -1]  # (n, V)
    tokens = torch.empty(n, 0, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    end_ids = torch.tensor(sorted(ends), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            token = draw(probs, generator)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        done |= token == stop_id
        if ends:
            done |= torch.isin(token, end_ids)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        logits = model(token[:, None], cache=cache, start=length + step, real=real)[:, -1]
    return [_until(row, stop_id, ends) for row in tokens.tolist()]


def _until(row: list[int], stop_id: int | None, ends: Collection[int]) -> list[int]:
    """A row up to its stop token (left out) or its first end token (kept)."""
    for i, token in enumerate(row):
        if token == stop_id:
            return row[:i]
        if token in ends:
            return row[:i + 1]
    return row
