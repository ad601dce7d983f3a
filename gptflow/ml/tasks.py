"""Instruction tasks: Super-NaturalInstructions task files, JSONL instruction
data, and the generated ``builtin:sentiment4`` task, in one shape.

A task has a definition, positive examples (demonstrations, never held out)
and instances, each with a list of acceptable outputs. Instances are split into
train / val / test by a hash of their input text, so duplicates never straddle
splits and the split of an instance never depends on the other instances.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, ValidationError

from gptflow.ml import corpora

SPLITS = ("train", "val", "test")
SENTIMENT4_DEFINITION = ("Classify the given review into one of four categories: Positive, "
                         "Negative, Neutral, Mixed. Mixed reviews praise one thing and "
                         "criticise another.")


@dataclass(frozen=True)
class Instance:
    id: str
    input: str
    outputs: tuple[str, ...]  # every acceptable answer
    split: str | None = None  # fixed by the source, else decided by hash


@dataclass
class Task:
    name: str
    definition: str
    instances: list[Instance]
    examples: list[tuple[str, str]] = field(default_factory=list)  # (input, output)
    categories: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str] | None:
        """The label set when this is a classification task, else None."""
        if not self.instances or any(len(i.outputs) != 1 for i in self.instances):
            return None
        counts = Counter(i.outputs[0] for i in self.instances)
        if len(counts) > min(20, max(2, len(self.instances) // 4)):
            return None
        return sorted(counts)

    @property
    def kind(self) -> str:
        if self.labels is not None:
            return "classification"
        if any("translation" in c.lower() for c in self.categories):
            return "translation"
        return "generation"

    def split(self, name: str, val_fraction: float = 0.1, test_fraction: float = 0.2
              ) -> list[Instance]:
        """The instances of split ``name``, in file order; ``held-out`` is val and test
        together: every instance no training saw, for scoring when nothing was chosen
        by its val score (a test split of 20 instances cannot tell models apart)."""
        names = ("val", "test") if name == "held-out" else (name,)
        return [i for i in self.instances
                if (i.split or _bucket(i.input, val_fraction, test_fraction)) in names]


def oversampled(instances: list[Instance], seed: int | str = 0) -> list[Instance]:
    """Classification instances with the smaller classes' repeated, drawn at random,
    until every class is as large as the largest: the baseline synthetic
    balancing has to beat."""
    by_label: dict[str, list[Instance]] = {}
    for instance in instances:
        by_label.setdefault(instance.outputs[0], []).append(instance)
    largest = max((len(group) for group in by_label.values()), default=0)
    rng = random.Random(seed)
    return instances + [rng.choice(group) for _, group in sorted(by_label.items())
                        for _ in range(largest - len(group))]


def default_split(instance: Instance) -> str:
    """The split an instance is in under the default fractions."""
    return split_of(instance.input, instance.split)


def split_of(text: str, fixed: str | None = None) -> str:
    """``fixed`` when the data says so, else the default fractions' bucket of ``text``."""
    return fixed or _bucket(text, 0.1, 0.2)


def _bucket(text: str, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def load_task_files(paths: Iterable[Path],
                    fields: tuple[str, str, str] = ("instruction", "input", "output")
                    ) -> list[Task]:
    """The tasks in NI task .json files, .jsonl instruction data, and folders of them."""
    tasks = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl")) \
            if path.is_dir() else [path]
        for file in files:
            tasks.append(load_jsonl(file, fields) if file.suffix == ".jsonl"
                         else load_natural_instructions(file))
    return tasks


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _NIExample(BaseModel):
    input: str
    output: str


class _NIInstance(BaseModel):
    id: str | int | None = None
    input: str
    output: Annotated[list[str], Field(min_length=1)] | str


class _NITask(BaseModel):
    """The part of a Super-NaturalInstructions task file gptflow reads."""

    Definition: Annotated[list[Text], Field(min_length=1)] | Text
    Instances: Annotated[list[_NIInstance], Field(min_length=1)]
    examples: list[_NIExample] = Field([], alias="Positive Examples")
    Categories: list[str] = []


def load_natural_instructions(path: Path) -> Task:
    """A Super-NaturalInstructions task file (Definition, Positive Examples, Instances);
    one that does not match the format is an error naming the file and field."""
    data = json.loads(read_text(path))
    try:
        ni = _NITask.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise ValueError(f"{path}: not a Natural Instructions task: {where.lstrip('.')}: "
                         f"{first['msg']}") from None
    return Task(
        name=path.stem,
        definition=ni.Definition[0] if isinstance(ni.Definition, list) else ni.Definition,
        instances=[Instance(str(n if i.id is None else i.id), i.input,
                            tuple(i.output if isinstance(i.output, list) else [i.output]))
                   for n, i in enumerate(ni.Instances)],
        examples=[(e.input, e.output) for e in ni.examples],
        categories=ni.Categories)


def read_text(path: Path) -> str:
    """A text file's contents; one that is not UTF-8 is an error naming it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start}: "
                         f"{data[e.start:e.start + 1]!r})") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line of a JSONL file; a line that is
    not a JSON object is an error naming the file and line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: a record is a JSON object")
            yield n, record


def load_jsonl(path: Path, fields: tuple[str, str, str]) -> Task:
    """JSONL instruction data: one record per line with instruction, input, output
    fields (names configurable); records sharing an instruction form one task."""
    instruction, input_, output = fields
    definitions: Counter[str] = Counter()
    instances = []
    for n, record in jsonl_records(path):
        for key in (input_, output):
            if key not in record:
                raise ValueError(f"{path}:{n}: no field {key!r}")
        out = record[output]
        if not (isinstance(out, str) or (isinstance(out, list) and out
                and all(isinstance(o, str) for o in out))):
            raise ValueError(f"{path}:{n}: field {output!r} is {json_kind(out)}, not a string "
                             "(or a list of reference strings)")
        for key in (input_, instruction):
            if not isinstance(record.get(key, ""), str):
                raise ValueError(f"{path}:{n}: field {key!r} is {json_kind(record[key])}, "
                                 "not a string")
        definitions[record.get(instruction, "")] += 1
        split = record.get("split")
        if split is not None and split not in SPLITS:
            raise ValueError(f"{path}:{n}: split {split!r} is not one of {SPLITS}")
        instances.append(Instance(str(record.get("id", n)), record[input_],
                                  tuple(out) if isinstance(out, list) else (out,), split))
    return Task(path.stem, definitions.most_common(1)[0][0] if definitions else "", instances)


def json_kind(value: Any) -> str:
    """How a wrong JSON value reads in an error: null, a number, a list, ..."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


Message = dict[str, str]


def load_conversations(path: Path, split: str) -> list[list[Message]]:
    """Chat data: JSONL records with ``messages: [{role, content}, ...]`` (the layout of
    OpenAI, ShareGPT-converted and Hugging Face chat datasets), the conversations of
    ``split`` (a record's own ``split``, else a hash of its first message)."""
    chats = []
    for n, record in jsonl_records(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"{path}:{n}: messages must be a list of {{role, content}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{path}:{n}: no assistant message: nothing to train on (the "
                             "loss is on the assistant's turns)")
        own = record.get("split")
        if split_of(messages[0]["content"], own) == split:
            chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return chats


DATASET_LAYOUT = 1  # of dataset artifacts: task and text records (docs/plugins.md)


def check_dataset_layout(folder: Path) -> None:
    """A dataset artifact written in a layout newer than this gptflow reads is refused
    by name, not misread (its ``artifact.json`` meta ``layout``; none means 1)."""
    try:
        layout = json.loads((folder / "artifact.json").read_text())["meta"].get("layout", 1)
    except (OSError, ValueError, KeyError, AttributeError):
        return  # a plain folder of JSONL files, not an artifact
    if not isinstance(layout, int) or layout > DATASET_LAYOUT:
        raise ValueError(f"{folder}: dataset layout {layout!r}; this gptflow reads layout "
                         f"{DATASET_LAYOUT} (upgrade gptflow)")


def load_dataset_tasks(folder: Path) -> list[Task]:
    """The tasks of a ``dataset`` artifact: one ``<task>.jsonl`` per task, records
    with definition, input, outputs and (optionally) split."""
    check_dataset_layout(folder)
    tasks = []
    for f in sorted(folder.glob("*.jsonl")):
        first = next(jsonl_records(f), (0, {}))
        if "input" not in first[1] and "text" in first[1]:
            raise ValueError(f"{f}: a text dataset (records with 'text'), where a task dataset "
                             "(definition, input, outputs) is read; a text dataset feeds "
                             "tokenize's data input")
        tasks.append(load_jsonl(f, ("definition", "input", "outputs")))
    return tasks


def write_dataset(folder: Path, task: Task, synthetic: Collection[str] = ()) -> Path:
    """``task`` as one ``<task>.jsonl`` of a dataset artifact; every record keeps
    its split and says whether it was generated (ids in ``synthetic``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in task.instances:
            f.write(json.dumps({"id": i.id, "definition": task.definition, "input": i.input,
                                "outputs": list(i.outputs),
                                "split": default_split(i),
                                "synthetic": i.id in synthetic}) + "\n")
    return path


def reversed_task(task: Task) -> Task:
    """The task run backwards — given an output (a label), write an input — so a
    model tuned on it generates synthetic data for ``task``. Instances keep the
    split of the forward task."""
    return Task(f"{task.name}-reversed",
                "Write an input for the following task whose correct output is the given "
                f"one. The task: {task.definition}",
                [Instance(i.id, i.outputs[0], (i.input,), default_split(i))
                 for i in task.instances],
                [(o, i) for i, o in task.examples], task.categories)


def sentiment4(n: str | int = 2000, seed: str | int = 0, test: str | int = 400,
               **shares: str) -> Task:
    """The generated 4-class review task: ``n`` train+val and ``test`` test instances.

    ``Mixed=0.05`` makes Mixed 5% of the train and val instances (the other
    classes share the rest equally); the test split always stays balanced.
    """
    unknown = set(shares) - set(corpora.LABELS)
    if unknown:
        raise ValueError(f"builtin:sentiment4: unknown option(s) {', '.join(sorted(unknown))}")
    fixed = {label: float(v) for label, v in shares.items()}
    rest = (1.0 - sum(fixed.values())) / max(1, len(corpora.LABELS) - len(fixed))
    if rest < 0 or any(v < 0 for v in fixed.values()):
        raise ValueError("builtin:sentiment4: class shares must be >= 0 and sum to at most 1")
    w = [fixed.get(label, rest) for label in corpora.LABELS]
    rng = random.Random(int(seed))
    instances = []
    for split, count, ws in (("test", int(test), [1.0] * 4), ("train", int(n), w)):
        for k, (text, label) in enumerate(corpora.labeled_reviews(count, rng.randrange(2**31),
                                                                  ws)):
            part = split if split == "test" else ("val" if k % 10 == 0 else "train")
            instances.append(Instance(f"sentiment4-{split}-{k}", text, (label,), part))
    examples = [(text, label) for label in corpora.LABELS
                for text, _ in [(corpora.review(random.Random(label), label), label)]]
    return Task("sentiment4", SENTIMENT4_DEFINITION, instances, examples,
                ["Sentiment Analysis"])
