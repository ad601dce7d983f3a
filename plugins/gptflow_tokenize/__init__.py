"""tokenize: train (or load) a tokenizer and encode a corpus into token shards.

YAML keys (``params``):

* ``corpus``: sources — ``builtin:python-docs``, ``builtin:reviews``, text files
  (one document each, or per paragraph or line: ``split_by``), folders, globs,
  ``.jsonl`` files (field ``text_field``);
* ``tokenizer``: ``bpe`` (byte-level BPE, trained here), ``char`` (one token per
  character) or the path of an existing ``tokenizer.json``;
* ``vocab_size``, ``min_frequency``, ``tokenizer_train_chars``: BPE training;
* ``val_fraction`` and ``split`` (``documents`` or ``tail``): the held-out split; a
  corpus with too few documents to hold whole ones out (one text file) holds out
  its tail instead, and says so (metric ``split``).

Inputs: optional ``data``, ``dataset`` artifacts from upstream nodes (a cleaning
node, synthetic data): each record's ``text_field``, or a task dataset's
definitions and inputs (never its outputs), read after ``corpus``; optional
``model``: encode with that model's tokenizer (held-out text for a pretrained
model's perplexity), instead of ``tokenizer``.

Outputs: ``tokenizer`` (``tokenizer.json``) and ``tokens`` (shards, ``meta.json``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from gptflow import Context, Input, NodeError, NodeType, Params, PathRef, hookimpl


class TokenizeParams(Params):
    corpus: list[Annotated[str, PathRef("corpus")]] = Field(default_factory=list)
    """Text sources: builtin:python-docs, builtin:reviews, files, folders, globs, .jsonl
    (none when the data input holds the whole corpus)."""
    tokenizer: Annotated[str, PathRef("tokenizer")] = "builtin:bpe"
    """builtin:bpe (train byte-level BPE), builtin:char, or a tokenizer.json path."""
    vocab_size: int = Field(4096, ge=300, le=1 << 20)
    """BPE vocabulary size, special tokens included."""
    min_frequency: int = Field(2, ge=1)
    """BPE merges need at least this many occurrences."""
    tokenizer_train_chars: int = Field(50_000_000, ge=1000)
    """Characters of the corpus the tokenizer is trained on (from the start)."""
    val_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of the corpus held out for validation."""
    split: Literal["documents", "tail"] = "documents"
    """documents: whole documents held out (tail when there are too few documents to
    leave some on each side); tail: the end of the text (nanoGPT)."""
    text_field: str = "text"
    """Field holding the text in .jsonl sources and text datasets."""
    split_by: Literal["file", "paragraph", "line"] = "file"
    """Documents of a plain text file: the whole file, each paragraph (text between
    blank lines), or each non-blank line."""

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _short_names(cls, v: Any) -> Any:
        return f"builtin:{v}" if v in ("bpe", "char") else v


def run(context: Context, inputs: dict[str, Any], p: TokenizeParams) -> dict[str, Any]:
    from gptflow.ml.data import dataset_documents, held_out_split, write_tokens
    from gptflow.ml.tokenizer import Tokenizer
    from gptflow.recipes.sources import documents

    datasets = inputs.get("data") or []
    if not p.corpus and not datasets:
        raise NodeError("nothing to read: give corpus: sources, or data: datasets from "
                        "upstream nodes")
    spool = context.work_dir / "documents.jsonl"
    started = time.perf_counter()
    with open(spool, "w", encoding="utf-8") as f:  # read every source once
        docs = itertools.chain(
            *(documents(source, p.text_field, p.split_by) for source in p.corpus),
            *(dataset_documents(d.path, p.text_field) for d in datasets))
        count = 0
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
    context.log.info("read the corpus in %.1f s", time.perf_counter() - started)
    split = held_out_split(count, p.val_fraction, p.split)
    if split != p.split:
        context.warn(f"{count} document(s): too few to hold whole ones out; the last "
                     f"{p.val_fraction:.0%} of the text is the validation split (split: tail)")

    if inputs.get("model") is not None:
        if p.tokenizer != "builtin:bpe":
            raise NodeError("params.tokenizer and a model input both name a tokenizer; "
                            "give one")
        tokenizer = Tokenizer.load(inputs["model"].path / "tokenizer.json")
    elif p.tokenizer == "builtin:bpe":
        tokenizer = Tokenizer.train_bpe(_head(spool, p.tokenizer_train_chars), p.vocab_size,
                                        p.min_frequency)
    elif p.tokenizer == "builtin:char":
        tokenizer = Tokenizer.train_char(_documents(spool))
    else:
        tokenizer = Tokenizer.load(Path(p.tokenizer))
    tokenizer.save(context.output_dir("tokenizer") / "tokenizer.json")

    started = time.perf_counter()
    meta = write_tokens(_documents(spool), tokenizer, context.output_dir("tokens"),
                        p.val_fraction, split,
                        progress=lambda docs, chars: context.progress(
                            docs, None, f"{docs} documents, {chars / 1e6:.1f} M chars"))
    seconds = time.perf_counter() - started
    spool.unlink()
    if not meta["chars"]:  # else both splits hold text: see held_out_split
        raise NodeError(f"the corpus ({', '.join(p.corpus) or 'the data input'}) holds no text")
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    return {"documents": meta["documents"], "chars": meta["chars"],
            "train_tokens": meta["splits"]["train"]["tokens"],
            "val_tokens": meta["splits"]["val"]["tokens"], "vocab_size": tokenizer.vocab_size,
            "chars_per_token": meta["chars"] / max(tokens, 1), "split": split,
            "encode_mb_per_s": meta["chars"] / 1e6 / max(seconds, 1e-9)}


def _documents(spool: Path) -> Iterator[str]:
    with open(spool, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _head(spool: Path, chars: int) -> Iterator[str]:
    for doc in _documents(spool):
        yield doc
        chars -= len(doc)
        if chars <= 0:
            return


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="tokenize", run=run, params=TokenizeParams, version="1",
        inputs={"data": Input("dataset", optional=True, many=True,
                              doc="datasets whose texts join the corpus"),
                "model": Input("model", optional=True, doc="encode with its tokenizer")},
        outputs={"tokenizer": "tokenizer", "tokens": "tokens"},
        headline=("train_tokens", "val_tokens", "vocab_size", "chars_per_token"),
        description="Train or load a tokenizer; encode a corpus into train/val token shards."))
