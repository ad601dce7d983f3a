"""Knowledge distillation: a student learns from a frozen teacher's softened
next-token distributions and from the true next tokens.

loss = alpha · T² · KL(teacher_T || student_T) + (1 - alpha) · CE(student, targets),
both over the positions whose target is not -100 (the only positions where
either head is computed). The T² keeps the soft term's gradients on the scale
of the hard one (Hinton et al.).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from gptflow.ml.instruct import IGNORE
from gptflow.ml.lm import CausalLM
from gptflow.ml.loss import shared_prefix
from gptflow.ml.model import GPT
from gptflow.ml.optim import Optim


def layers_kept(n_layer: int, keep: int) -> list[int]:
    """``keep`` block indices spread evenly over ``n_layer``, first and last included."""
    if not 1 <= keep <= n_layer:
        raise ValueError(f"keep_layers {keep} is not between 1 and the teacher's {n_layer}")
    if keep == 1:
        return [n_layer - 1]
    return sorted({round(i * (n_layer - 1) / (keep - 1)) for i in range(keep)})


def student_from_teacher(teacher: GPT, keep: int) -> GPT:
    """A student that starts as the teacher with only ``keep`` of its blocks
    (embeddings, final norm and head shared by copy): DistilBERT's
    initialisation, so that distillation refines a model that already speaks
    rather than teaching one from nothing."""
    kept = layers_kept(teacher.config.n_layer, keep)
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            if int(index) not in kept:
                continue
            key = f"blocks.{kept.index(int(index))}.{rest}"
        state[key] = tensor.detach().clone()
    return GPT.from_state_dict(replace(teacher.config, n_layer=len(kept)), state)


def kd_loss(student: Tensor, teacher: Tensor, targets: Tensor, alpha: float,
            temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(total, soft KL term, hard CE term) for logits (..., V) and targets (...)."""
    mask = targets != IGNORE
    s, t = student[mask].float(), teacher[mask].float()
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature**2
    hard = F.cross_entropy(s, targets[mask])
    return alpha * soft + (1 - alpha) * hard, soft, hard


def supervised_logits(model: GPT, x: Tensor, keep: Tensor) -> Tensor:
    """The head's logits (N, V) at the N positions ``keep`` marks only."""
    shared = shared_prefix(model, x, keep)
    return model.lm_head(model.hidden(x, shared=shared)[keep[:, shared:]])


class DistillLM(CausalLM):
    """CausalLM whose training loss also matches a frozen teacher; only the
    student's parameters are in the optimizer."""

    def __init__(self, student: GPT, teacher: GPT, optim: Optim, max_steps: int,
                 alpha: float, temperature: float) -> None:
        super().__init__(student, optim, max_steps)
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule
        self.alpha, self.temperature = alpha, temperature

    def on_fit_start(self) -> None:
        self.teacher[0].to(self.device)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.alpha == 0:  # plain training on the data: the teacher need not run
            return super().training_step(batch, batch_idx)
        x, y = batch
        keep = y != IGNORE
        with torch.no_grad():
            teacher_logits = supervised_logits(self.teacher[0], x, keep)
        loss, soft, hard = kd_loss(supervised_logits(self.model, x, keep), teacher_logits,
                                   y[keep], self.alpha, self.temperature)
        self.log_dict({"train_loss": loss, "kd_loss": soft, "ce_loss": hard})
        return loss
