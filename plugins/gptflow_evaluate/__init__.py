"""evaluate: measure one or more models side by side, with baselines.

YAML keys (``params``):

* ``tasks``: task sources (as in instruction-finetune); classification tasks get
  accuracy, macro-F1 (each with the half-width of its 95% bootstrap interval over
  the instances, ``accuracy_ci95``, ``macro_f1_ci95``), per-class F1 and a
  confusion matrix, with a majority-class and a random baseline; generation
  tasks exact match and ROUGE-L; translation tasks BLEU and chrF too; every
  prediction is scored against every reference;
* ``split``: which instances (``test``; ``held-out``: val and test, every instance
  no training saw, when nothing was chosen by val scores); ``max_instances`` per task;
* ``classify_by``: ``likelihood`` (the allowed label with the highest
  log-likelihood) or ``generate`` (free generation);
* ``k_examples``: demonstrations in prompts (default: what the model was tuned with);
* ``compare_to``: one of ``models`` (its node name): every other model's gains
  over it on each classification task, ``accuracy_gain`` and ``macro_f1_gain``,
  with the bounds of their 95% paired-bootstrap intervals (``..._gain_low``,
  ``..._gain_high``: both models scored on the same resampled instances), the
  test of "better" on a small test split.

Inputs: ``models`` (a list of model artifacts); optional ``tokens`` for
perplexity on their validation split, in windows of ``context`` tokens (at most
each model's own context). Output: ``report`` — ``report.json``
(the split scored and flat rows of model, task, metric, value), ``report.md`` (models side by side),
PNG confusion matrices and a bar chart of each task's headline metric.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from gptflow import Context, Input, NodeError, NodeType, Params, PathRef, hookimpl


class EvaluateParams(Params):
    tasks: list[Annotated[str, PathRef("tasks")]] = Field(default_factory=list)
    """Task sources: NI task .json files, folders, globs, .jsonl, builtin:sentiment4."""
    fields: tuple[str, str, str] = ("instruction", "input", "output")
    """Field names of instruction, input and output in .jsonl sources."""
    split: Literal["train", "val", "test", "held-out"] = "test"
    max_instances: int = Field(300, ge=1)
    """Instances scored per task (the first ones of the split, in file order)."""
    classify_by: Literal["likelihood", "generate"] = "likelihood"
    k_examples: int | None = Field(None, ge=0)
    """Demonstrations per prompt; default: the model's own setting, else 0."""
    compare_to: str | None = None
    """A model of ``models`` (its node name) the others' classification gains are
    measured against, with paired 95% intervals."""
    max_new_tokens: int = Field(48, ge=1)
    """Generation length for generation tasks."""
    batch_size: int = Field(8, ge=1)
    """Prompts generated together (a CPU reads every weight once per token for the
    whole batch, so eight rows cost little more than one); the answers do not change."""
    context: int = Field(1024, ge=2)
    """Perplexity window in tokens (at most each model's context)."""
    seed: int = 0


def run(context: Context, inputs: dict[str, Any], p: EvaluateParams) -> dict[str, Any]:
    from gptflow.ml.checkpoint import folder_bytes, load_any
    from gptflow.ml.data import SequentialWindows, TokenShards
    from gptflow.ml.evaluation import (
        baselines,
        class_indices,
        classification_metrics,
        classify,
        generate_answers,
        generation_metrics,
        generation_speed,
        paired_gains,
        perplexity,
        prompts_for,
    )
    from gptflow.ml.quant import logical_params
    from gptflow.recipes import sources
    from gptflow_evaluate.report import render

    names = [artifact.producer for artifact in inputs["models"]]
    if p.compare_to is not None and p.compare_to not in names:
        raise NodeError(f"params.compare_to: {p.compare_to!r} is not one of the models "
                        f"({', '.join(names)})")
    tasks = [t for source in p.tasks for t in sources.tasks(source, p.fields)]
    rows: list[dict[str, Any]] = []
    confusions: dict[tuple[str, str], Any] = {}
    classified: dict[tuple[str, str], tuple[Any, Any, int]] = {}  # class indices, k

    def add(model: str, task: str, metrics: dict[str, float]) -> None:
        rows.extend({"model": model, "task": task, "metric": k, "value": v}
                    for k, v in metrics.items())

    for task in tasks:
        labels = task.labels
        if labels is not None:
            golds = [i.outputs[0] for i in task.split(p.split)[: p.max_instances]]
            for name, metrics in baselines([i.outputs[0] for i in task.split("train")], golds,
                                           labels, p.seed).items():
                add(name, task.name, metrics)
    for n, artifact in enumerate(inputs["models"]):
        name = artifact.producer
        model, tokenizer, loaded = load_any(artifact.path, inference=True)
        add(name, "-", {"params": logical_params(model),
                        "trainable_params": sum(q.numel() for q in model.parameters()
                                                if q.requires_grad),
                        "bytes_on_disk": folder_bytes(artifact.path),
                        "gen_tokens_per_s": generation_speed(model, tokenizer)})
        if inputs.get("tokens") is not None:
            windows = SequentialWindows(TokenShards(inputs["tokens"].path, "val"),
                                        min(p.context, model.config.context))
            add(name, "-", {"perplexity": perplexity(model, windows)})
        for t, task in enumerate(tasks):
            context.progress(n * len(tasks) + t, len(tasks) * len(inputs["models"]),
                             f"{name} on {task.name}")
            instances = task.split(p.split)[: p.max_instances]
            if not instances:
                continue
            prompts = prompts_for(task, [i.input for i in instances], loaded.prompt, tokenizer,
                                  p.k_examples)
            labels = task.labels
            if labels is not None:
                if p.classify_by == "likelihood":
                    preds = classify(model, tokenizer, prompts, labels, loaded.prompt)
                else:
                    preds = generate_answers(model, tokenizer, prompts, 8, p.batch_size)
                golds = [i.outputs[0] for i in instances]
                metrics, confusion = classification_metrics(preds, golds, labels)
                confusions[(name, task.name)] = (labels, confusion)
                classified[(name, task.name)] = (*class_indices(preds, golds, labels),
                                                 len(labels))
            else:
                preds = generate_answers(model, tokenizer, prompts, p.max_new_tokens,
                                         p.batch_size)
                metrics = generation_metrics(preds, [i.outputs for i in instances],
                                             task.kind == "translation")
            add(name, task.name, {**metrics, "instances": len(instances)})
    for (name, task_name), (preds, golds, k) in classified.items():
        if p.compare_to is not None and name != p.compare_to:
            add(name, task_name, paired_gains(preds, classified[(p.compare_to, task_name)][0],
                                              golds, k))
    out = context.output_dir("report")
    (out / "report.json").write_text(json.dumps({"split": p.split, "rows": rows}, indent=2))
    render(out, rows, confusions)
    summary: dict[str, Any] = {"models": len(inputs["models"]), "tasks": len(tasks)}
    scored = [r for r in rows if r["metric"] in ("accuracy", "macro_f1")
              and r["model"] not in ("majority", "random")]
    for row in scored:
        summary[f"{row['model']}.{row['task']}.{row['metric']}"] = row["value"]
    f1 = [r for r in scored if r["metric"] == "macro_f1"]
    if f1:
        best = max(f1, key=lambda r: r["value"])
        summary.update(best_model=best["model"], best_macro_f1=best["value"])
    return summary


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="evaluate", run=run, params=EvaluateParams, version="3",
        inputs={"models": Input("model", "adapter", many=True,
                                doc="the models (or adapters, applied to their base) to compare"),
                "tokens": Input("tokens", optional=True, doc="perplexity on its val split")},
        outputs={"report": "report"},
        headline=("best_model", "best_macro_f1", "models", "tasks"),
        description="Compare models on tasks and held-out text, with baselines."))
