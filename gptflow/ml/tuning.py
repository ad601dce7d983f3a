"""Instruction tuning shared by full fine-tuning and LoRA: load the tasks,
encode them, train with the prompt masked, report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from gptflow.errors import NodeError
from gptflow.ml.instruct import Batches, InstructionBatches, encode_examples
from gptflow.ml.lm import CausalLM
from gptflow.ml.model import GPT
from gptflow.ml.quant import logical_params
from gptflow.ml.tasks import load_dataset_tasks, load_tasks, reversed_task
from gptflow.ml.tokenizer import Tokenizer
from gptflow.ml.training import fit, loss_curve
from gptflow.nodes import Artifact, Context
from gptflow.params import InstructionParams, OptimParams


def tune(context: Context, model: GPT, tokenizer: Tokenizer, p: InstructionParams,
         data: Sequence[Artifact] = (),
         make_module: Callable[[GPT, OptimParams, int], CausalLM] = CausalLM,
         ) -> tuple[L.Trainer, dict[str, Any]]:
    """Train ``model`` (its trainable parameters) on the tasks, with the loss of
    ``make_module`` (plain next-token loss by default); returns the trainer and
    the metrics every tuning node reports."""
    L.seed_everything(p.seed, verbose=False)
    tasks = [t for source in p.tasks for t in load_tasks(source, p.fields)]
    tasks += [t for artifact in data for t in load_dataset_tasks(artifact.path)]
    if not tasks:
        raise NodeError("no tasks: give params.tasks or a data input")
    if p.reverse:
        tasks = [reversed_task(t) for t in tasks]
    max_len = min(p.max_len or model.config.context, model.config.context)
    train, val = (encode_examples(tasks, tokenizer, split, max_len, p.k_examples, p.template,
                                  p.max_per_task if split == "train" else None, p.seed)
                  for split in ("train", "val"))
    if not val:
        raise NodeError("the tasks have no validation instances")
    context.log.info("%d training and %d validation examples from %d tasks", len(train),
                     len(val), len(tasks))
    module = make_module(model, p.optim, p.trainer.max_steps)
    batches = InstructionBatches(train, p.batch_size, tokenizer.pad_id, p.seed)
    val_loader = DataLoader(Batches(val, p.batch_size, tokenizer.pad_id), batch_size=None)
    trainer, tput, final = fit(context, module, batches, val_loader, p.trainer,
                               p.trainer.max_steps)
    params = logical_params(model)
    trainable = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in trainable)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return trainer, {
        "params": params, "trainable_params": n_trainable,
        "trainable_share": n_trainable / params,
        # what training holds for the model: weights as stored (NF4 for QLoRA), and
        # for each trainable parameter its gradient and AdamW's two moments
        "train_state_bytes": weights + 3 * sum(q.numel() * q.element_size() for q in trainable),
        "steps": trainer.global_step,
        "train_examples": len(train), "val_examples": len(val), "tasks": len(tasks),
        "tokens_per_s": tput.tokens_per_s,
        **final}


def prompt_info(p: InstructionParams) -> dict[str, Any]:
    """What evaluate needs to prompt a tuned model the way it was trained."""
    return {"template": p.template, "k_examples": p.k_examples, "reverse": p.reverse}


def finish(context: Context, trainer: L.Trainer, out_name: str) -> None:
    """The loss curve beside the output (rank 0 only)."""
    if trainer.is_global_zero:
        loss_curve(context, context.output_dir(out_name) / "loss.png")
