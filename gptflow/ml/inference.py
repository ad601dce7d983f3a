"""A model in the form inference runs it, with the same weights: NF4 layers
de-quantized once (into bf16 where the CPU computes in bf16), int4 weights kept
in their kernel's layout, and dense weights on CPU stored transposed.

Why transposed: decoding one token at a time is a chain of matrix-vector
products that stream every weight from memory. On CPU, ``x @ W^T`` with W^T
stored (in, out) reads it about 1.3x faster than ``F.linear`` over W stored
(out, in) on the same bytes (SmolLM2's whole weight pass: 42-44 vs 55-59 ms on
this project's 2-core machines; 6.1 vs 11.4 ms for its 49k-row head alone),
and the results are identical.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptflow.ml.quant import Int4Linear, NF4Linear, dequantize_model

M = TypeVar("M", bound=nn.Module)


class DecodeLinear(nn.Module):
    """A frozen dense linear layer whose weight is stored transposed, (in, out),
    computing in the weight's dtype (fp32, or bf16 for a de-quantized NF4 layer)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(),
                                     requires_grad=False)
        self.bias = linear.bias

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight_t.t().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = (x.to(self.weight_t.dtype) @ self.weight_t).to(x.dtype)
        return y if self.bias is None else y + self.bias


class TiedEmbedding(nn.Module):
    """The token embedding read from the tied head's transposed table (a column
    per token), so the matrix is still stored once."""

    def __init__(self, head: DecodeLinear) -> None:
        super().__init__()
        self.head = head

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.head.weight_t.t())  # (..., C)


def nf4_compute_dtype(device: torch.device) -> torch.dtype:
    """What an NF4 model computes in once de-quantized: bf16 on a CPU with bf16
    instructions (NF4 values lose nothing a 4-bit code holds in bf16, and half the
    bytes stream per token: SmolLM2 generated 1.14x its fp32 speed, where NF4
    de-quantized to fp32 ran at 0.95x), as QLoRA computes; fp32 elsewhere."""
    cpu_bf16 = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if cpu_bf16 else torch.float32


def for_inference(model: M) -> M:
    """``model`` as inference runs it: NF4 layers de-quantized once (no NF4 kernel
    is as fast as a dense matmul, and de-quantizing at every token generated 25x
    slower), in :func:`nf4_compute_dtype`; int8 and int4 layers keep their kernels,
    int4 its weights in the kernel's layout too; dense fp32 and bf16 layers on CPU
    transposed (:class:`DecodeLinear`), a tied embedding reading the head's table."""
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if nf4:
        dequantize_model(model, (NF4Linear,), nf4_compute_dtype(nf4[0].codes.device))
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.keep_packed = True
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    dense = [(name, m) for name, m in model.named_modules()
             if type(m) is nn.Linear and m.weight.device.type == "cpu"
             and m.weight.dtype in (torch.float32, torch.bfloat16)]
    for name, linear in dense:
        parent, _, child = name.rpartition(".")
        layer = DecodeLinear(linear)
        setattr(model.get_submodule(parent), child, layer)
        if tied and name == "lm_head" and isinstance(getattr(model, "embed", None), nn.Embedding):
            model.embed = TiedEmbedding(layer)  # type: ignore[assignment]
    return model
