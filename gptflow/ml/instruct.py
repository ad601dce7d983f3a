"""Instruction data as token batches: the prompt is masked out of the loss.

An example is (prompt ids, target ids): the target is the first acceptable
output (after the prompt format's separator) + end-of-text; for a chat
conversation, one example per assistant turn, its history as the prompt.
Batches are padded to their longest example, and drawn from length-sorted pools
so that little compute goes to padding.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from gptflow.ml.prompts import PromptFormat
from gptflow.ml.tasks import Task, oversampled
from gptflow.ml.tokenizer import Tokenizer

IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt: np.ndarray
    target: np.ndarray


def encode_examples(tasks: Sequence[Task], tokenizer: Tokenizer, split: str, max_len: int,
                    prompt: PromptFormat | None = None, max_per_task: int | None = None,
                    seed: int = 0, oversample: bool = False) -> list[Example]:
    """Every instance of ``split`` as an Example (with ``oversample``, a
    classification task's smaller classes repeated up to its largest); prompts
    lose their oldest tokens when prompt + target exceed ``max_len``."""
    prompt = prompt or PromptFormat()
    examples = []
    for task in tasks:
        instances = task.split(split)
        if max_per_task is not None and len(instances) > max_per_task:
            instances = random.Random(f"{seed}/{task.name}").sample(instances, max_per_task)
        if oversample and task.labels is not None:
            instances = oversampled(instances, f"{seed}/{task.name}")
        prompts = tokenizer.encode_batch([prompt.render(task, i.input, tokenizer=tokenizer)
                                          for i in instances])
        targets = tokenizer.encode_batch([prompt.answer_prefix + i.outputs[0]
                                          for i in instances])
        for ids, target in zip(prompts, targets, strict=True):
            target = np.append(target, tokenizer.eot_id)[: max_len // 2]
            examples.append(Example(ids[-(max_len - len(target)):], target))
    return examples


def encode_conversations(conversations: Sequence[Sequence[Mapping[str, str]]],
                         tokenizer: Tokenizer, max_len: int) -> list[Example]:
    """Chat data, loss on the assistant's turns only: every assistant message is
    one example whose prompt is the conversation before it, rendered by the
    model's chat template with the assistant header, and whose target is the
    message and the model's end-of-turn token."""
    examples = []
    for messages in conversations:
        for n, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.encode(tokenizer.render_chat(messages[:n]))
            target = np.append(tokenizer.encode_batch([message["content"]])[0],
                               tokenizer.eot_id)[: max_len // 2]
            examples.append(Example(np.asarray(prompt[-(max_len - len(target)):]), target))
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets, padded; targets are IGNORE on the prompt
    and on padding, so only output tokens carry loss."""
    length = max(len(e.prompt) + len(e.target) for e in examples) - 1
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.from_numpy(np.concatenate([e.prompt, e.target]).astype(np.int64))
        x[row, : len(ids) - 1] = ids[:-1]
        y[row, len(e.prompt) - 1: len(ids) - 1] = ids[len(e.prompt):]
    return x, y


def real_positions(targets: Tensor) -> Tensor:
    """Which positions of a batch (B, T) are not padding: a row ends at its last
    target, since :func:`collate` pads after it (every row of a pretraining window
    is real)."""
    supervised = targets != IGNORE
    length = targets.size(-1) - supervised.flip(-1).int().argmax(dim=-1)  # (B,)
    length = torch.where(supervised.any(dim=-1), length, 0)
    return torch.arange(targets.size(-1), device=targets.device) < length[:, None]


def real_tokens(targets: Tensor) -> int:
    """How many tokens of a batch are not padding."""
    return int(real_positions(targets).sum())


class InstructionBatches(IterableDataset[tuple[Tensor, Tensor]]):
    """Endless shuffled batches of examples of similar length, but not neighbours.

    Each pool of 50 batches is sorted by length, and each run of ``SPREAD``
    batches' worth of it is dealt out round-robin: a batch spans a slightly wider
    range of lengths (8.7% padding instead of 1.3% on the six NI tasks at batch
    8), while the examples next to each other in length order, the copies of an
    oversampled example or the instances of one task (whose definition fixes
    most of the length), go to different batches. Batches of neighbours
    repeated one example several times each and taught a classifier of
    oversampled task823 to always answer one label (macro-F1 0.08; dealt: 0.56).

    Batch k is a pure function of (seed, k), so a resumed run continues where
    it stopped (``start_batch``).
    """

    SPREAD = 8

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, seed: int,
                 rank: int = 0) -> None:
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.pad_id = list(examples), batch_size, pad_id
        self.seed, self.rank, self.start_batch = seed, rank, 0
        self.per_epoch = max(1, len(self.examples) // batch_size)

    def _epoch(self, epoch: int) -> list[list[Example]]:
        order = list(self.examples)
        random.Random(f"{self.seed}/{self.rank}/{epoch}").shuffle(order)
        pool = self.batch_size * 50
        batches = []
        for start in range(0, self.per_epoch * self.batch_size, pool):
            chunk = sorted(order[start:start + pool], key=lambda e: len(e.prompt) + len(e.target))
            for run in range(0, len(chunk), self.batch_size * self.SPREAD):
                dealt = chunk[run:run + self.batch_size * self.SPREAD]
                n = max(1, len(dealt) // self.batch_size)
                batches += [dealt[j::n] for j in range(n)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches
        random.Random(f"{self.seed}/{self.rank}/{epoch}/batches").shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, offset = divmod(self.start_batch, self.per_epoch)
        for e in itertools.count(epoch):
            for batch in self._epoch(e)[offset:]:
                yield collate(batch, self.pad_id)
            offset = 0


class Batches(Dataset[tuple[Tensor, Tensor]]):
    """Fixed padded batches of examples in length order (for validation)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int) -> None:
        ordered = sorted(examples, key=lambda e: len(e.prompt) + len(e.target))
        self.batches = [collate(ordered[i:i + batch_size], pad_id)
                        for i in range(0, len(ordered), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.batches[i]
