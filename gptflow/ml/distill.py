"""Knowledge distillation: a student learns from a frozen teacher's softened
next-token distributions and from the true next tokens.

loss = alpha · T² · KL(teacher_T || student_T) + (1 - alpha) · CE(student, targets).
The soft term is the mean over every real (non-padding) position, the prompt's
included: the teacher's distribution over the next token is a signal wherever
text is, and on a classification prompt the targets are ~5 of ~170 positions.
Positions in the batch's common prefix (the same text in every row: a chat
header, one task's definition) are left out, since the model computes them once
(:func:`shared_prefix`). The hard term is over the targets only. The T² keeps
the soft term's gradients on the scale of the hard one (Hinton et al.).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gptflow.ml.instruct import IGNORE, real_positions
from gptflow.ml.lm import CausalLM
from gptflow.ml.loss import chunk_rows, example_weights, head_loss, shared_prefix
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


def kd_loss(student: Tensor, teacher: Tensor, targets: Tensor, heads: tuple[nn.Module, nn.Module],
            alpha: float, temperature: float, weights: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
    """(total, soft KL term, hard CE term) for the student's and the teacher's hidden
    states (N, C) at N positions, their ``heads`` (student's, teacher's) and the
    targets (N,), IGNORE where only the soft term applies; ``weights`` (one per
    target, summing to 1) weigh the hard term's, else it is their mean."""
    student_head, teacher_head = heads
    rows = chunk_rows(student_head)
    soft = sum((checkpoint(_kl_sum, student_head, teacher_head, student[s:s + rows],
                           teacher[s:s + rows], temperature, use_reentrant=False)
                for s in range(0, len(student), rows)), student.new_zeros((), dtype=torch.float32))
    soft = soft / len(student) * temperature**2
    supervised = targets != IGNORE
    hard = head_loss(student_head, student[supervised], targets[supervised], "mean", weights)
    return alpha * soft + (1 - alpha) * hard, soft, hard


def _kl_sum(student_head: nn.Module, teacher_head: nn.Module, student: Tensor, teacher: Tensor,
            temperature: float) -> Tensor:
    """KL(teacher_T || student_T) summed over a chunk of rows; checkpointed, so that
    no chunk's (rows, V) logits are kept for the backward pass."""
    with torch.no_grad():
        target = F.log_softmax(teacher_head(teacher).float() / temperature, -1)
    log_p = F.log_softmax(student_head(student).float() / temperature, -1)
    return F.kl_div(log_p, target, log_target=True, reduction="sum")


class DistillLM(CausalLM):
    """CausalLM whose training loss also matches a frozen teacher; only the
    student's parameters are in the optimizer."""

    def __init__(self, student: GPT, teacher: GPT, optim: Optim, max_steps: int,
                 alpha: float, temperature: float, reduction: str = "mean") -> None:
        super().__init__(student, optim, max_steps, reduction)
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule
        self.alpha, self.temperature = alpha, temperature

    def on_fit_start(self) -> None:
        self.teacher[0].to(self.device)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.alpha == 0:  # plain training on the data: the teacher need not run
            return super().training_step(batch, batch_idx)
        x, y = batch
        shared = shared_prefix(self.model, x, y != IGNORE)
        real = real_positions(y)[:, shared:]
        with torch.no_grad():
            teacher = self.teacher[0].hidden(x, shared=shared)[real]
        targets = y[:, shared:]
        weights = example_weights(targets != IGNORE) if self.reduction == "example" else None
        loss, soft, hard = kd_loss(self.model.hidden(x, shared=shared)[real], teacher,
                                   targets[real], (self.model.lm_head, self.teacher[0].lm_head),
                                   self.alpha, self.temperature, weights)
        self.log_dict({"train_loss": loss, "kd_loss": soft, "ce_loss": hard})
        return loss
