"""Rendering an evaluation report: a Markdown table with models side by side,
confusion matrices and a bar chart of each task's headline metric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEADLINE = ("macro_f1", "rouge_l", "accuracy", "exact_match")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


def render(folder: Path, rows: Sequence[Mapping[str, Any]],
           confusions: Mapping[tuple[str, str], tuple[Sequence[str], Any]]) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    value = {(r["model"], r["task"], r["metric"]): r["value"] for r in rows}
    lines = []
    for task in tasks:
        metrics = list(dict.fromkeys(r["metric"] for r in rows if r["task"] == task))
        cols = [m for m in models if any((m, task, k) in value for k in metrics)]
        lines += [f"### {'models' if task == '-' else task}", "",
                  "| metric | " + " | ".join(cols) + " |",
                  "| --- |" + " --- |" * len(cols)]
        lines += ["| " + k + " | " + " | ".join(fmt(value.get((m, task, k), "")) for m in cols)
                  + " |" for k in metrics]
        lines.append("")
    (folder / "report.md").write_text("\n".join(lines))
    _plots(folder, models, tasks, value, confusions)


def _plots(folder: Path, models: Sequence[str], tasks: Sequence[str],
           value: Mapping[tuple[str, str, str], Any],
           confusions: Mapping[tuple[str, str], tuple[Sequence[str], Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for (model, task), (labels, matrix) in confusions.items():
        fig, ax = plt.subplots(figsize=(4 + 0.3 * len(labels), 3.5 + 0.3 * len(labels)), dpi=100)
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, str(int(matrix[i][j])), ha="center", va="center", fontsize=8)
        ax.set_title(f"{model} on {task}")
        fig.tight_layout()
        fig.savefig(folder / f"confusion-{model}-{task}.png")
        plt.close(fig)
    for task in tasks:
        metric = next((k for k in HEADLINE if any((m, task, k) in value for m in models)), None)
        if metric is None:
            continue
        shown = [m for m in models if (m, task, metric) in value]
        fig, ax = plt.subplots(figsize=(1.2 * len(shown) + 2, 3.5), dpi=100)
        colors = ["#bbbbbb" if m in ("majority", "random") else "#4c72b0" for m in shown]
        ax.bar(shown, [value[(m, task, metric)] for m in shown], color=colors)
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.set_ylim(0, 1)
        fig.tight_layout()
        fig.savefig(folder / f"{metric}-{task}.png")
        plt.close(fig)
