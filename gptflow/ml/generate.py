"""Sampling with a KV cache: temperature, top-k, top-p, seed, stop at end-of-text."""

from __future__ import annotations

from collections.abc import Sequence

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


@torch.inference_mode()
def generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_id: int | None = None) -> list[int]:
    """Continue ``prompt``; returns only the new tokens (without the stop token).

    ``temperature=0`` is greedy decoding. Prompts longer than the context keep
    their most recent tokens.
    """
    cfg = model.config
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    prompt = list(prompt)[-(cfg.context - 1):] or [stop_id or 0]
    max_new_tokens = min(max_new_tokens, cfg.context - len(prompt))
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, 1, len(prompt) + max_new_tokens, device, dtype)
    idx = torch.tensor([prompt], device=device)
    logits = model(idx, cache=cache, start=0, last_only=True)[:, -1]  # (1, V)
    out: list[int] = []
    pos = len(prompt)
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = int(logits.argmax(dim=-1))
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token == stop_id:
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), cache=cache, start=pos)[:, -1]
        pos += 1
    return out
