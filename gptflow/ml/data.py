"""Text sources, token shards, and the datasets that feed training.

Token artifacts hold ``{split}-{k:05d}.bin`` shards of uint16/uint32 ids with an
end-of-text token after every document, plus ``meta.json`` and a copy of the
``tokenizer.json`` they were encoded with. Shards are written while documents
stream in, and read back memory-mapped: no corpus needs to fit in memory.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from gptflow.ml.tasks import (
    check_dataset_layout,
    json_kind,
    jsonl_records,
    load_natural_instructions,
    read_text,
)
from gptflow.ml.tokenizer import Tokenizer

GOLDEN = (math.sqrt(5) - 1) / 2


SplitBy = Literal["file", "paragraph", "line"]
PARAGRAPH = re.compile(r"\n[ \t]*\n+")


def file_documents(paths: Iterable[Path], text_field: str = "text",
                   split_by: SplitBy = "file") -> Iterator[str]:
    """The documents of files and folders (folders read recursively, in name order).

    ``.jsonl`` files give one document per line (field ``text_field``); Natural
    Instructions task files (``.json``) give their definition and their inputs,
    never their outputs, so that pretraining cannot see held-out answers; other
    files are one document each, or one per paragraph (text between blank lines)
    or per non-blank line (``split_by``).
    """
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".jsonl":
                for n, record in jsonl_records(file):
                    if not isinstance(record.get(text_field), str):
                        raise ValueError(f"{file}:{n}: field {text_field!r} is "
                                         f"{_kind(record, text_field)}, not a string")
                    yield record[text_field]
            elif file.suffix == ".json":
                task = load_natural_instructions(file)
                yield task.definition
                yield from (i.input for i in task.instances)
            else:
                yield from split_text(read_text(file), split_by)


def split_text(text: str, split_by: SplitBy) -> Iterator[str]:
    if split_by == "file":
        yield text
        return
    parts = PARAGRAPH.split(text) if split_by == "paragraph" else text.splitlines()
    yield from (part for part in parts if part.strip())


def dataset_documents(folder: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of a ``dataset`` artifact: each record's ``text_field`` (a text
    dataset), or a task dataset's definition and inputs, never its outputs."""
    check_dataset_layout(folder)
    for file in sorted(folder.glob("*.jsonl")):
        definitions: set[str] = set()
        for n, record in jsonl_records(file):
            if isinstance(record.get(text_field), str):
                yield record[text_field]
            elif isinstance(record.get("input"), str):
                definition = str(record.get("definition", ""))
                if definition and definition not in definitions:
                    definitions.add(definition)
                    yield definition
                yield record["input"]
            else:
                raise ValueError(f"{file}:{n}: a dataset record with neither {text_field!r} "
                                 f"(a text dataset) nor 'input' (a task dataset); it has "
                                 f"{', '.join(sorted(record)) or 'no fields'}")


def _kind(record: dict[str, Any], key: str) -> str:
    return json_kind(record[key]) if key in record else "missing"


def is_val(index: int, fraction: float) -> bool:
    """Deterministic, evenly spread choice of validation documents."""
    return (index * GOLDEN) % 1.0 < fraction


def held_out_split(documents: int, fraction: float, split: str) -> str:
    """``split``, or ``tail`` where holding out whole documents would leave train or
    validation empty (a single text file, a handful of documents)."""
    if split != "documents" or not fraction:
        return split
    some_val = any(is_val(i, fraction) for i in range(documents))
    some_train = any(not is_val(i, fraction) for i in range(documents))  # both stop early
    return split if some_val and some_train else "tail"


class ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype[Any], shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.limit = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._file: Any = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self._in_shard >= self.limit:
                self._open()
            take = ids[: self.limit - self._in_shard]
            self._file.write(take.astype(self.dtype).tobytes())
            self._in_shard += len(take)
            self.shards[-1]["tokens"] += len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def _open(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 (closed in close())
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_tokens(docs: Iterable[str], tokenizer: Tokenizer, folder: Path, val_fraction: float,
                 split: str = "documents", shard_tokens: int = 1 << 27, batch_docs: int = 4096,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Encode documents into train/val shards; returns the meta written to meta.json.

    ``split="documents"`` sends whole documents to validation (no document is in
    both splits); ``split="tail"`` holds out the last tokens of the stream, as
    nanoGPT does for a single text.
    """
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    writers = {s: ShardWriter(folder, s, dtype, shard_tokens) for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    chars = 0
    index = 0
    docs = iter(docs)
    while batch := list(itertools.islice(docs, batch_docs)):
        groups: dict[str, list[str]] = {"train": [], "val": []}
        for doc in batch:
            held_out = split == "documents" and is_val(index, val_fraction)
            groups["val" if held_out else "train"].append(doc)
            index += 1
            chars += len(doc)
        for name, group in groups.items():
            if group:
                writers[name].write(tokenizer.encode_documents(group))
                counts[name] += len(group)
        if progress:
            progress(index, chars)
    for writer in writers.values():
        writer.close()
    if split == "tail":
        _move_tail(folder, writers, dtype, val_fraction)
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
            "documents": index, "chars": chars, "split": split, "val_fraction": val_fraction,
            "splits": {name: {"tokens": w.tokens, "documents": counts[name], "shards": w.shards}
                       for name, w in writers.items()}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    tokenizer.save(folder / "tokenizer.json")
    return meta


def _move_tail(folder: Path, writers: dict[str, ShardWriter], dtype: np.dtype[Any],
               fraction: float) -> None:
    """Hold out the last ``fraction`` of the train stream as validation."""
    train = writers["train"]
    keep = train.tokens - int(train.tokens * fraction)
    val = writers["val"]
    seen = 0
    for shard in list(train.shards):
        path = folder / shard["file"]
        start, end = seen, seen + shard["tokens"]
        seen = end
        if end <= keep:
            continue
        cut = max(keep - start, 0)
        ids = np.fromfile(path, dtype=dtype)
        val.write(ids[cut:])
        if cut:
            with open(path, "r+b") as f:
                f.truncate(cut * dtype.itemsize)
            shard["tokens"] = cut
        else:
            path.unlink()
            train.shards.remove(shard)
    val.close()
    train.tokens = keep


class TokenShards:
    """Memory-mapped view of one split of a tokens artifact."""

    def __init__(self, folder: Path, split: str) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        self.meta = meta
        dtype = np.dtype(meta["dtype"])
        self.arrays = [np.memmap(folder / s["file"], dtype=dtype, mode="r")
                       for s in meta["splits"][split]["shards"] if s["tokens"]]
        self.tokens = sum(len(a) for a in self.arrays)


class RandomWindows(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Endless batches of random (context + 1)-token windows, nanoGPT style.

    Batch k is a pure function of (seed, rank, k), so a resumed run continues
    the exact sequence from ``start_batch`` instead of replaying it.
    """

    def __init__(self, shards: TokenShards, context: int, batch_size: int, seed: int,
                 rank: int = 0) -> None:
        self.shards, self.context, self.batch_size = shards, context, batch_size
        self.seed, self.rank, self.start_batch = seed, rank, 0
        usable = [max(len(a) - context - 1, 0) for a in shards.arrays]
        if not sum(usable):
            raise ValueError(f"{shards.tokens} tokens are too few for context {context}")
        self.weights = np.array(usable, dtype=np.float64) / sum(usable)
        self.usable = usable

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in itertools.count(self.start_batch):
            rng = np.random.default_rng((self.seed, self.rank, k))
            which = rng.choice(len(self.usable), size=self.batch_size, p=self.weights)
            rows = [self.shards.arrays[s][o: o + self.context + 1]
                    for s, o in zip(which, (rng.integers(0, self.usable[s]) for s in which),
                                    strict=True)]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield batch[:, :-1], batch[:, 1:]


class SequentialWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every token of a split exactly once as a prediction target: for a
    validation loss over the whole split."""

    def __init__(self, shards: TokenShards, context: int) -> None:
        self.context = context
        self.index = [(a, start) for a in shards.arrays
                      for start in range(0, max(len(a) - 1, 0), context)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        array, start = self.index[i]
        ids = np.asarray(array[start: start + self.context + 1], dtype=np.int64)
        window = torch.from_numpy(ids)
        x, y = window[:-1], window[1:]
        pad = self.context - len(x)
        if pad:  # the last window of a shard: targets beyond it are ignored
            x = torch.cat([x, torch.zeros(pad, dtype=torch.int64)])
            y = torch.cat([y, torch.full((pad,), -100, dtype=torch.int64)])
        return x, y
