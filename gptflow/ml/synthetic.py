"""Synthetic instances for the small classes of a classification task.

A generator (a model tuned on the task run backwards: label -> text) samples
texts for a label; each sample passes filters in order — length bounds, exact
duplicates and near duplicates (word n-gram Jaccard similarity against the
real texts and the samples kept so far), and optionally a classifier that must
assign it the intended label — until every class reaches its target count or
the attempt budget runs out.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gptflow.ml.evaluation import prompts_for
from gptflow.ml.generate import sample
from gptflow.ml.model import GPT
from gptflow.ml.prompts import PromptFormat
from gptflow.ml.tasks import Instance, Task, default_split, reversed_task
from gptflow.ml.tokenizer import Tokenizer

WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Case and spacing do not make a text new."""
    return " ".join(WORD.findall(text.lower()))


class NearDuplicates:
    """Texts indexed by their word n-grams; ``similarity`` is the highest Jaccard
    similarity of a text's n-gram set to any indexed text (candidates found
    through the index, so the cost grows with shared n-grams, not with size)."""

    def __init__(self, n: int = 3) -> None:
        self.n = n
        self.sets: list[frozenset[tuple[str, ...]]] = []
        self.index: dict[tuple[str, ...], list[int]] = {}

    def grams(self, text: str) -> frozenset[tuple[str, ...]]:
        words = normalize(text).split()
        return frozenset(tuple(words[i:i + self.n])
                         for i in range(max(1, len(words) - self.n + 1)))

    def similarity(self, text: str) -> float:
        grams = self.grams(text)
        shared: Counter[int] = Counter(d for g in grams for d in self.index.get(g, ()))
        return max((c / (len(grams) + len(self.sets[d]) - c) for d, c in shared.items()),
                   default=0.0)

    def add(self, text: str) -> None:
        grams = self.grams(text)
        for g in grams:
            self.index.setdefault(g, []).append(len(self.sets))
        self.sets.append(grams)


def targets(counts: Mapping[str, int], balance: bool, wanted: Mapping[str, int]
            ) -> dict[str, int]:
    """How many synthetic instances each label needs: up to ``wanted[label]``
    when given, else (``balance``) up to the largest class."""
    goal = {label: wanted.get(label, max(counts.values()) if balance else 0) for label in counts}
    return {label: max(0, goal[label] - counts[label]) for label in counts}


@dataclass
class Filters:
    min_chars: int = 10
    max_chars: int = 1000
    near_duplicate: float = 0.7  # Jaccard of word 3-grams at or above which a text is a copy
    ngram: int = 3


@dataclass
class Outcome:
    task: Task  # real instances and the kept synthetic ones
    synthetic: list[str] = field(default_factory=list)  # ids of the synthetic instances
    after: dict[str, int] = field(default_factory=dict)  # train counts per label
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count
    generated: int = 0


Classify = Callable[[Task, Sequence[str]], list[str]]


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = 0.95
    max_new_tokens: int = 64
    batch: int = 16
    max_attempts: float = 5.0  # samples drawn per needed instance, at most
    seed: int = 0


def synthesize(task: Task, generator: GPT, tokenizer: Tokenizer, need: Mapping[str, int],
               prompt: PromptFormat, filters: Filters, sampling: Sampling,
               classify: Classify | None = None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> Outcome:
    """Add up to ``need[label]`` synthetic train instances per label to ``task``."""
    outcome = Outcome(task)
    seen = {normalize(i.input) for i in task.instances}
    near = NearDuplicates(filters.ngram)
    for i in task.instances:
        near.add(i.input)
    backwards = reversed_task(task)
    kept: list[Instance] = []
    total, seed = sum(need.values()), sampling.seed
    for label, count in need.items():
        ids = tokenizer.encode_prompt(prompts_for(backwards, [label], prompt, tokenizer)[0])
        budget = int(count * sampling.max_attempts)
        accepted = 0
        while accepted < count and budget > 0:
            n = min(sampling.batch, budget)
            budget -= n
            seed += 1
            rows = sample(generator, ids, n, sampling.max_new_tokens, sampling.temperature,
                          sampling.top_k, sampling.top_p, seed, tokenizer.eot_id)
            texts = [tokenizer.decode(r).strip() for r in rows]
            outcome.generated += n
            candidates = []
            for text in texts:
                reason = _reject(text, filters, seen, near)
                if reason:
                    outcome.rejected[reason] += 1
                    continue
                candidates.append(text)
                seen.add(normalize(text))
                near.add(text)
            if classify is not None and candidates:
                predicted = classify(task, candidates)
                outcome.rejected["classifier disagrees"] += sum(p != label for p in predicted)
                candidates = [t for t, p in zip(candidates, predicted, strict=True) if p == label]
            room = count - accepted
            for text in candidates[:room]:
                kept.append(Instance(f"synthetic-{label}-{len(kept)}", text, (label,), "train"))
            if len(candidates) > room:  # passed every filter, but the class is full
                outcome.rejected["surplus"] += len(candidates) - room
            accepted = min(count, accepted + len(candidates))
            progress(len(kept), total)
    outcome.synthetic = [i.id for i in kept]
    outcome.task = Task(task.name, task.definition,
                        [*(Instance(i.id, i.input, i.outputs, default_split(i))
                           for i in task.instances), *kept],
                        task.examples, task.categories)
    outcome.after = dict(Counter(i.outputs[0] for i in outcome.task.split("train")))
    return outcome


def _reject(text: str, filters: Filters, seen: set[str], near: NearDuplicates) -> str | None:
    if len(text) < filters.min_chars:
        return "too short"
    if len(text) > filters.max_chars:
        return "too long"
    if normalize(text) in seen:
        return "exact duplicate"
    if near.similarity(text) >= filters.near_duplicate:
        return "near duplicate"
    return None
