"""The optimizer settings a training module takes (pure Python: params models
build them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Optim:
    """AdamW with linear warmup and cosine decay; weight decay on matrices only."""

    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-4  # at the end of the cosine decay
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
