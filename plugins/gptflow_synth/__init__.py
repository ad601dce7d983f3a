"""generate-synthetic-data: balance a classification task's training split with
texts a generator writes for the small classes.

The generator is a model tuned on the task backwards (``instruction-finetune``
with ``reverse: true``: label in, text out); it is prompted exactly as it was
tuned. Samples pass, in order: length bounds, exact-duplicate and near-duplicate
removal (word n-gram Jaccard against every real text and every kept sample), and
with a ``classifier`` input, agreement of that classifier with the intended label.

YAML keys (``params``): ``tasks`` (task sources, as in instruction-finetune),
``balance`` (bring every class up to the largest), ``counts`` (or explicit
target counts per label), ``temperature``, ``top_k``, ``top_p``,
``max_new_tokens``, ``batch``, ``max_attempts`` (samples drawn per needed
instance, at most), ``min_chars``, ``max_chars``, ``near_duplicate``,
``ngram``, ``seed``.

Inputs: ``generator`` (model or adapter), optional ``classifier`` (model or
adapter), optional ``data`` (datasets with more tasks). Output: ``dataset`` —
one ``<task>.jsonl`` per task, every record with its split and
``synthetic: true/false``, plus ``report.md`` / ``report.json`` (counts per
class before and after, rejections by reason) and ``counts.png``.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from gptflow import Context, Input, NodeError, NodeType, Params, PathRef, hookimpl


class SynthParams(Params):
    tasks: list[Annotated[str, PathRef("tasks")]] = Field(default_factory=list)
    """Classification task sources: NI task files, .jsonl, builtin:sentiment4."""
    fields: tuple[str, str, str] = ("instruction", "input", "output")
    """Field names of instruction, input and output in .jsonl sources."""
    balance: bool = True
    """Bring every class of the train split up to the size of the largest."""
    counts: dict[str, int] = Field(default_factory=dict)
    """Target train-split size per label (overrides balance for those labels)."""
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch: int = Field(16, ge=1)
    """Samples decoded together (one prompt per label, so no padding)."""
    max_attempts: float = Field(5.0, ge=1)
    """Samples drawn per needed instance, at most: a class may stay short."""
    min_chars: int = Field(10, ge=0)
    max_chars: int = Field(1000, ge=1)
    near_duplicate: float = Field(0.7, gt=0, le=1)
    """Word n-gram Jaccard similarity at or above which a sample is a copy."""
    ngram: int = Field(3, ge=1)
    seed: int = 0


def run(context: Context, inputs: dict[str, Any], p: SynthParams) -> dict[str, Any]:
    from gptflow.ml.checkpoint import load_any
    from gptflow.ml.evaluation import classify, prompts_for
    from gptflow.ml.synthetic import Filters, Sampling, synthesize, targets
    from gptflow.ml.tasks import DATASET_LAYOUT, Task, load_dataset_tasks, write_dataset
    from gptflow.recipes import sources

    tasks = [t for source in p.tasks for t in sources.tasks(source, p.fields)]
    tasks += [t for artifact in inputs.get("data") or [] for t in load_dataset_tasks(artifact.path)]
    if not tasks:
        raise NodeError("no tasks: give params.tasks or a data input")
    for task in tasks:
        if task.labels is None:
            raise NodeError(f"task {task.name!r} is not a classification task (one output per "
                            "instance from a small label set)")
        unknown = set(p.counts) - set(task.labels)
        if unknown:
            raise NodeError(f"params.counts: {', '.join(sorted(unknown))} not a label of "
                            f"{task.name!r} ({', '.join(task.labels)})")
    generator, tokenizer, loaded = load_any(inputs["generator"].path, inference=True)
    if not loaded.prompt.reverse:
        context.log.warning("the generator was not tuned with reverse: true; it may not "
                            "write texts for labels")
    checker = None
    if inputs.get("classifier") is not None:
        clf, clf_tokenizer, clf_loaded = load_any(inputs["classifier"].path, inference=True)

        def checker(task: Task, texts: Any) -> list[str]:
            prompts = prompts_for(task, texts, clf_loaded.prompt, clf_tokenizer)
            return classify(clf, clf_tokenizer, prompts, task.labels or [], clf_loaded.prompt)

    out = context.output_dir("dataset")
    context.set_meta("dataset", layout=DATASET_LAYOUT)
    report: dict[str, Any] = {}
    for task in tasks:
        counts = {label: 0 for label in task.labels or []}
        counts.update(Counter(i.outputs[0] for i in task.split("train")))
        need = targets(counts, p.balance, p.counts)
        outcome = synthesize(
            task, generator, tokenizer, need, loaded.prompt,
            Filters(p.min_chars, p.max_chars, p.near_duplicate, p.ngram),
            Sampling(p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.batch,
                     p.max_attempts, p.seed),
            checker, partial(_progress, context, task.name))
        write_dataset(out, outcome.task, outcome.synthetic)
        report[task.name] = {"before": counts, "after": {**counts, **outcome.after},
                             "generated": outcome.generated,
                             "kept": len(outcome.synthetic), "rejected": dict(outcome.rejected)}
    _write_report(out, report)
    generated = sum(r["generated"] for r in report.values())
    kept = sum(r["kept"] for r in report.values())
    return {"generated": generated, "kept": kept,
            "acceptance": kept / generated if generated else 1.0,
            **{f"{name}.{label}": n for name, r in report.items()
               for label, n in r["after"].items()}}


def _progress(context: Context, name: str, done: int, total: int) -> None:
    context.progress(done, total, name)


def _write_report(out: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = []
    for name, r in report.items():
        lines += [f"### {name}", "", "| label | real (train) | synthetic | total |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {label} | {n} | {r['after'][label] - n} | {r['after'][label]} |"
                  for label, n in r["before"].items()]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "none"
        lines += ["", f"Generated {r['generated']}, kept {r['kept']}; rejected — {reasons}.", ""]
    (out / "report.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, len(report), figsize=(5 * len(report), 3.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], report.items(), strict=True):
        labels = list(r["before"])
        real = [r["before"][k] for k in labels]
        ax.bar(labels, real, label="real")
        ax.bar(labels, [r["after"][k] - r["before"][k] for k in labels], bottom=real,
               label="synthetic")
        ax.set_title(name)
        ax.set_ylabel("train instances")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "counts.png", dpi=100)
    plt.close(fig)


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="generate-synthetic-data", run=run, params=SynthParams, version="1",
        inputs={"generator": Input("model", "adapter",
                                   doc="writes a text given its label (reverse: true)"),
                "classifier": Input("model", "adapter", optional=True,
                                    doc="keep a sample only if this model gives it its label"),
                "data": Input("dataset", optional=True, many=True,
                              doc="datasets with more classification tasks")},
        outputs={"dataset": "dataset"},
        headline=("generated", "kept", "acceptance"),
        description="Balance a classification task with generated, filtered texts."))
