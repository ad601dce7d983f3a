"""Instruction tuning shared by full fine-tuning, LoRA and task distillation:
load the tasks, encode them with the prompt masked, train, report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader

from gptflow.errors import NodeError
from gptflow.ml.instruct import (
    Batches,
    Example,
    InstructionBatches,
    encode_conversations,
    encode_examples,
)
from gptflow.ml.lm import CausalLM
from gptflow.ml.model import GPT
from gptflow.ml.optim import Optim
from gptflow.ml.quant import logical_params
from gptflow.ml.tasks import Task, load_dataset_tasks, reversed_task
from gptflow.ml.tokenizer import Tokenizer
from gptflow.nodes import Artifact, Context
from gptflow.recipes import sources
from gptflow.recipes.params import InstructionParams
from gptflow.recipes.training import Fitted, fit, seed


def tune(context: Context, model: GPT, tokenizer: Tokenizer, p: InstructionParams,
         data: Sequence[Artifact] = (),
         make_module: Callable[[GPT, Optim, int, str], CausalLM] = CausalLM) -> Fitted:
    """Train ``model`` (its trainable parameters) on the tasks, with the loss of
    ``make_module`` (plain next-token loss by default)."""
    seed(p.seed)
    tasks = [t for source in p.tasks for t in sources.tasks(source, p.fields)]
    tasks += [t for artifact in data for t in load_dataset_tasks(artifact.path)]
    if not tasks and not p.chats:
        raise NodeError("no tasks: give params.tasks, params.chats or a data input")
    if (p.format == "chat" or p.chats) and not tokenizer.config.chat_template:
        raise NodeError(f"params.{'chats' if p.chats else 'format'}: chat data needs a model "
                        "with a chat template (an instruct model: its tokenizer_config.json "
                        "or GGUF metadata holds it)")
    if p.reverse:
        tasks = [reversed_task(t) for t in tasks]
    train, val = encode_splits(tasks, tokenizer, p, min(p.max_len or model.config.context,
                                                        model.config.context))
    if not val:
        raise NodeError("the tasks have no validation instances")
    context.log.info("%d training and %d validation examples from %d tasks and %d chat "
                     "sources", len(train), len(val), len(tasks), len(p.chats))
    module = make_module(model, p.optim.config(), p.trainer.max_steps,
                         "example" if p.loss_weight == "example" else "mean")
    batches = InstructionBatches(train, p.batch_size, tokenizer.pad_id, p.seed)
    val_loader = DataLoader(Batches(val, p.batch_size, tokenizer.pad_id), batch_size=None)
    fitted = fit(context, module, batches, val_loader, p.trainer, p.trainer.max_steps)
    fitted.metrics.update(train_examples=len(train), val_examples=len(val), tasks=len(tasks),
                          **tuning_footprint(model))
    return fitted


def encode_splits(tasks: Sequence[Task], tokenizer: Tokenizer, p: InstructionParams,
                  max_len: int) -> tuple[list[Example], list[Example]]:
    """The training and validation examples of the tasks and chat sources; caps
    and oversampling shape the training split only."""
    def encoded(split: str) -> list[Example]:
        train = split == "train"
        return (encode_examples(tasks, tokenizer, split, max_len, p.prompt(),
                                p.max_per_task if train else None, p.seed,
                                p.oversample and train)
                + encode_conversations(
                    [c for source in p.chats for c in sources.conversations(source, split)],
                    tokenizer, max_len))

    return encoded("train"), encoded("val")


def tuning_footprint(model: GPT) -> dict[str, Any]:
    """What tuning holds for the model: its weights as stored (NF4 for QLoRA) and,
    for each trainable parameter, its gradient and AdamW's two moments."""
    trainable = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in trainable)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"trainable_share": n_trainable / logical_params(model),
            "train_state_bytes": weights + 3 * sum(q.numel() * q.element_size()
                                                   for q in trainable)}
