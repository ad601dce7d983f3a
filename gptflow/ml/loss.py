"""The next-token loss with the output head computed only where it counts.

Instruction tuning puts loss on the output tokens, a few of ~160 on a
classification prompt: the head (C x V, V = 49k-150k for today's models) and
the cross-entropy run only at those positions, and in chunks of rows whose
gradients are taken as they go (softmax - one-hot), so a (B, T, V) float
tensor never exists, in pretraining either. The rows of a batch of one task's
instances begin with the same definition: it is computed once for the batch
(:func:`shared_prefix`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gptflow.ml.instruct import IGNORE
from gptflow.ml.model import GPT

CHUNK_ELEMENTS = 2**23  # logits per chunk of rows in the head's loss (32 MB in fp32)
MIN_SHARED = 8  # fewer leading tokens in common are computed per row, as they come


def token_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE, reduction=reduction)


def supervised_loss(model: GPT, x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token NLL of ``model`` on inputs ``x`` and targets ``y`` (B, T), with
    the head computed only where a target is not IGNORE. ``reduction``: "mean" over
    the targets, "example" (the mean over rows of each row's mean: a row's answer
    weighs the same however many tokens it has), "sum", or "none" (each target's
    NLL, in row-major order)."""
    keep = y != IGNORE
    shared = shared_prefix(model, x, keep)
    h = model.hidden(x, shared=shared)[keep[:, shared:]]  # (N, C)
    if reduction == "example":
        return head_loss(model.lm_head, h, y[keep], "mean", example_weights(keep))
    return head_loss(model.lm_head, h, y[keep], reduction)


def example_weights(keep: Tensor) -> Tensor:
    """A weight for each True of ``keep`` (B, T), in row-major order: 1 / (its row's
    Trues x the rows with any), so that every row with a target weighs the same."""
    counts = keep.sum(dim=1)
    per_row = 1.0 / (counts.clamp(min=1) * int((counts > 0).sum()))
    return per_row.float()[keep.nonzero()[:, 0]]


def shared_prefix(model: GPT, x: Tensor, keep: Tensor) -> int:
    """How many leading tokens all rows of ``x`` (B, T) have in common where no row
    has a target (``keep`` False): they are computed once (``GPT.hidden``'s
    ``shared``). 0 where sharing would change the result (dropout in training draws
    one mask per row) or save little."""
    if len(x) < 2 or (model.training and model.config.dropout > 0):
        return 0
    same = (x == x[:1]).all(dim=0) & ~keep.any(dim=0)  # (T,)
    length = int(same.int().cumprod(dim=0).sum())
    return length if length >= MIN_SHARED else 0


def chunk_rows(head: torch.nn.Module) -> int:
    """Rows of hidden states whose logits through ``head`` make ``CHUNK_ELEMENTS``."""
    vocab: int = getattr(head, "out_features")  # noqa: B009 (linear, quantized or adapted)
    return max(1, CHUNK_ELEMENTS // vocab)


def head_loss(head: torch.nn.Module, h: Tensor, targets: Tensor, reduction: str,
              weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``head(h)`` (N, V) against ``targets`` (N,), ``CHUNK_ELEMENTS``
    logits at a time; with ``weights`` (N,), each row's term is weighted, and "mean"
    is their weighted sum (weights that sum to 1, as example_weights gives)."""
    rows = chunk_rows(head)
    plain_linear = type(head) is torch.nn.Linear and head.bias is None
    if torch.is_grad_enabled() and plain_linear and (h.requires_grad or head.weight.requires_grad):
        if reduction == "none":
            raise ValueError("reduction='none' is for scoring, without gradients")
        total = _LinearCrossEntropy.apply(h, head.weight, targets, rows, weights)  # type: ignore[no-untyped-call]
    else:  # scoring in chunks; a quantized or adapted head trains through its own backward
        step = max(1, len(h)) if torch.is_grad_enabled() else rows
        losses = torch.cat([F.cross_entropy(head(h[s:s + step]).float(), targets[s:s + step],
                                            reduction="none")
                            for s in range(0, len(h), step)] or [h.new_zeros(0)])
        if weights is not None:
            losses = losses * weights
        total = losses if reduction == "none" else losses.sum()
    if reduction == "mean" and weights is None:
        return total / len(targets)  # nan when nothing is supervised, as F.cross_entropy
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of CE(h @ W^T, targets) (each row's times its weight, when given), its
    gradients computed chunk by chunk in the forward pass (softmax - one-hot), so
    no chunk's logits outlive it."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, targets: Tensor, rows: int,
                weights: Tensor | None) -> Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else weight.dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, len(h), rows):
                hc, t = h[s:s + rows].to(dtype), targets[s:s + rows]
                logits = (hc @ w.T).float()  # (rows, V)
                lse = logits.logsumexp(dim=-1)
                nll = lse - logits.gather(1, t[:, None]).squeeze(1)
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad[torch.arange(len(t), device=h.device), t] -= 1
                if weights is not None:
                    nll = nll * weights[s:s + rows]
                    grad.mul_(weights[s:s + rows, None])
                total += nll.sum()
                grad = grad.to(dtype)
                if grad_h is not None:
                    grad_h[s:s + rows] = grad @ w
                if grad_w is not None and dtype == weight.dtype:
                    grad_w.addmm_(grad.T, hc)
                elif grad_w is not None:
                    grad_w += (grad.T @ hc).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out,
                None if grad_w is None else grad_w * grad_out, None, None, None)
