"""LoRA: low-rank adapters on chosen linear layers of a frozen model.

y = W x + (alpha / r) · B A dropout(x), with A (r, in) random and B (out, r)
zero, so an adapted model starts exactly equal to its base. Only A and B
train; adapters save alone (a few KB to MB) and merge into W exactly.
The base layer may be an :class:`~gptflow.ml.quant.NF4Linear` or an
:class:`~gptflow.ml.quant.Int4Linear` (QLoRA), and the token embedding then int4
rows too (``quantize_embeddings``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptflow.ml.adapter import LoraConfig
from gptflow.ml.quant import (
    GGUF_BLOCK,
    Int4Linear,
    NF4Linear,
    quantize_embedding,
    replace_linears,
)

ADAPTER_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        out_features: int = getattr(base, "out_features")  # noqa: B009 (nn.Module typing)
        in_features: int = getattr(base, "in_features")  # noqa: B009
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> Tensor:
        """The weight update B A · scale, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not isinstance(self.base, nn.Linear):
            raise TypeError("only a full-precision base merges in place; dequantize it first")
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            assert isinstance(self.base, nn.Linear)
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float,
               dropout: float = 0.0, also_train: Sequence[str] = ()) -> list[str]:
    """Wrap every linear layer whose name matches a pattern; freeze everything
    else but the parameters named by ``also_train`` (peft's modules_to_save),
    which are then saved with the adapter. Returns the wrapped layer names."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatch(name, t) for t in also_train))
    names = [name for name, module in model.named_modules()
             if hasattr(module, "in_features") and not isinstance(module, LoRALinear)
             and any(fnmatch.fnmatch(name, t) for t in targets) and name != "lm_head"]
    if not names:
        raise ValueError(f"no linear layer matches {list(targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def base_layer(config: LoraConfig) -> Callable[[nn.Linear], nn.Module] | None:
    """How each frozen linear layer of the base is kept: in 4 bits for QLoRA
    (None: as it is). Passed to the loader, it quantizes the base layer by layer."""
    if config.quantize_base == "nf4":
        return lambda linear: NF4Linear(linear, config.nf4_block, config.double_quant)
    if config.quantize_base == "int4":
        return lambda linear: Int4Linear(linear, GGUF_BLOCK)
    return None


def prepare(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Turn a base model into the adapted one ``config`` describes: the linear layers
    not yet in their QLoRA form converted first (:func:`base_layer`), then LoRA on
    the chosen layers. Returns the config with the exact names of the adapted
    layers, which is what an adapter saves."""
    make = base_layer(config)
    if make is not None:
        replace_linears(model, make)
        if config.quantize_embeddings:
            quantize_embedding(model, lambda linear: Int4Linear(linear, GGUF_BLOCK))
    names = apply_lora(model, config.layers, config.rank, config.alpha, config.dropout,
                       config.also_train)
    return replace(config, layers=tuple(names))


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only what the adapter trains: LoRA weights and any other trainable parameter."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ADAPTER_KEYS or k in trainable}


def load_adapter(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter weights; every adapter key must match and nothing else may be given."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"adapter does not fit this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]}")
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name in state:
                tensor.copy_(state[name])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
    return model
