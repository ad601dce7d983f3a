"""The causal language-model LightningModule: next-token NLL, AdamW with warmup
and cosine decay, exact validation loss over a whole split.

Targets equal to -100 carry no loss (prompt tokens in instruction tuning,
padding), so the same module trains pretraining and fine-tuning. The output
head is computed only at positions that have a target (on a classification
prompt, a few of ~160; see :mod:`gptflow.ml.loss`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from gptflow.ml.loss import supervised_loss
from gptflow.ml.model import GPT
from gptflow.ml.optim import Optim


def lr_lambda(optim: Optim, max_steps: int) -> Any:
    """Multiplier of optim.lr: linear warmup, then cosine decay to min_lr."""
    floor = optim.min_lr / optim.lr

    def schedule(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings; none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


class CausalLM(L.LightningModule):
    def __init__(self, model: GPT, optim: Optim, max_steps: int, reduction: str = "mean"
                 ) -> None:
        super().__init__()
        self.model, self.optim, self.max_steps = model, optim, max_steps
        self.reduction = reduction  # of the training loss: supervised_loss's "mean" or "example"
        self._val_sum = torch.zeros((), dtype=torch.float64)
        self._val_count = 0

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = supervised_loss(self.model, x, y, self.reduction)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self._val_sum += supervised_loss(self.model, x, y, reduction="sum").double()
        self._val_count += int((y != -100).sum())

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(
            torch.tensor(float(self._val_count), device=self.device), reduce_op="sum")
        loss = float(total / max(float(count), 1.0))
        self.log("val_loss", loss, rank_zero_only=True)
        self.log("val_ppl", math.exp(min(loss, 50.0)), rank_zero_only=True)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Under FSDP the norm spans every shard, so the wrapped model clips it
        (Lightning's FSDP precision plugin refuses to clip by norm)."""
        clip_grad_norm = getattr(self.trainer.model, "clip_grad_norm_", None)
        if gradient_clip_val and clip_grad_norm and gradient_clip_algorithm in (None, "norm"):
            clip_grad_norm(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        groups = param_groups(self.model, self.optim.weight_decay)
        # fused: one kernel, not one per tensor; Lightning's mixed precision refuses to
        # clip the gradients of a fused optimizer
        fused = "mixed" not in str(self._trainer.precision if self._trainer else "") and all(
            p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        opt = torch.optim.AdamW(groups, lr=self.optim.lr, fused=fused,
                                betas=(self.optim.beta1, self.optim.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
