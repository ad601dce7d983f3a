"""Small node types for testing the core (loaded with GPTFLOW_PLUGINS=toy_nodes)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict

from gptflow import Context, Input, NodeError, NodeType, PathRef, hookimpl

VERSION = os.environ.get("TOY_VERSION", "1")


class TextParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    text: str = "hello"
    """The text to write."""
    repeat: int = 1
    """How many times."""


def run_text(ctx: Context, inputs: dict[str, Any], p: TextParams) -> dict[str, Any]:
    # TOY_SUFFIX: a code change that changes the output without a version bump
    (ctx.output_dir("data") / "text.txt").write_text(p.text * p.repeat
                                                     + os.environ.get("TOY_SUFFIX", ""))
    return {"chars": len(p.text) * p.repeat}


class ConcatParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sep: str = "+"


def run_concat(ctx: Context, inputs: dict[str, Any], p: ConcatParams) -> None:
    parts = [(a.path / "text.txt").read_text() for a in inputs["parts"]]
    (ctx.output_dir("data") / "text.txt").write_text(p.sep.join(parts))


class ReadParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Annotated[str, PathRef()]


def run_read(ctx: Context, inputs: dict[str, Any], p: ReadParams) -> None:
    (ctx.output_dir("data") / "text.txt").write_text(Path(p.path).read_text())


class SlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunks: int = 10
    seconds: float = 0.1
    """Pause after each chunk."""


def run_slow(ctx: Context, inputs: dict[str, Any], p: SlowParams) -> dict[str, Any]:
    """Writes chunk by chunk and keeps a resume point in its work folder."""
    done_file = ctx.work_dir / "done"
    start = int(done_file.read_text()) if done_file.exists() else 0
    with open(ctx.output_dir("data") / "text.txt", "a") as out:
        for i in range(p.chunks):
            out.write(f"chunk {i}\n")
            out.flush()
            if i >= start:
                time.sleep(p.seconds)
                done_file.write_text(str(i + 1))
            ctx.progress(i + 1, p.chunks, "writing")
    return {"resumed_from": start}


class FailParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = "boom"


def run_fail(ctx: Context, inputs: dict[str, Any], p: FailParams) -> None:
    raise NodeError(p.message)


class ModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def run_model(ctx: Context, inputs: dict[str, Any], p: ModelParams) -> None:
    (ctx.output_dir("model") / "config.json").write_text("{}")


class MisbehaveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    how: str = "numpy"


def run_misbehave(ctx: Context, inputs: dict[str, Any], p: MisbehaveParams) -> Any:
    """Every mistake a node's run() can make with its metrics and its files."""
    out = ctx.output_dir("data")
    (out / "text.txt").write_text("x")
    if p.how == "numpy":
        import numpy as np

        return {"acc": np.float32(0.5), "n": np.int64(3), "per_class": [np.float64(0.25)]}
    if p.how == "torch":
        import torch

        return {"loss": torch.tensor(1.5)}
    if p.how == "set":
        return {"labels": {"a", "b"}}
    if p.how == "list":
        return [1, 2]
    if p.how == "beside":
        (out.parent / "stray.txt").write_text("x")
    if p.how == "symlink":
        (out / "host").symlink_to("/etc/hostname")
    if p.how == "input":
        (inputs["after"].path / "new.txt").write_text("x")
    return None


def run_clean(ctx: Context, inputs: dict[str, Any], p: ReadParams) -> None:
    """A third party's cleaning node: a text dataset, one record per non-blank line."""
    import json

    lines = [line.strip() for line in Path(p.path).read_text().splitlines() if line.strip()]
    with open(ctx.output_dir("data") / "clean.jsonl", "w") as out:
        out.writelines(json.dumps({"text": line}) + "\n" for line in lines)


def run_threads(ctx: Context, inputs: dict[str, Any], p: TextParams) -> dict[str, Any]:
    """How many threads torch has here, and when it ran (two seconds)."""
    import torch

    started = time.time()
    (ctx.output_dir("data") / "text.txt").write_text(p.text)
    time.sleep(2.0)
    return {"threads": torch.get_num_threads(), "started": started, "ended": time.time()}


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType("text", run_text, TextParams, {"data": "dataset"}, version=VERSION,
                      description="Write a text."))
    register(NodeType("concat", run_concat, ConcatParams, {"data": "dataset"},
                      {"parts": Input("dataset", many=True)}, description="Join texts."))
    register(NodeType("read", run_read, ReadParams, {"data": "dataset"}))
    register(NodeType("clean", run_clean, ReadParams, {"data": "dataset"}))
    register(NodeType("slow", run_slow, SlowParams, {"data": "dataset"},
                      {"after": Input("dataset", optional=True)}))
    register(NodeType("fail", run_fail, FailParams, {"data": "dataset"},
                      {"after": Input("dataset", optional=True)}))
    register(NodeType("make-model", run_model, ModelParams, {"model": "model"}))
    register(NodeType("misbehave", run_misbehave, MisbehaveParams, {"data": "dataset"},
                      {"after": Input("dataset", optional=True)}))
    register(NodeType("threads", run_threads, TextParams, {"data": "dataset"}))
