"""Synthetic balancing: pipelines/balance.yaml — a classifier trained on sentiment4
with Mixed at 2% of the training data, against the same recipe trained after a
label-conditioned generator brought every class up to the largest. Both are
scored on the same balanced test split. Writes the "Synthetic balancing" section
of RESULTS.md.

    python benchmarks/balance.py [--store DIR] [--set PATH=VALUE ...]
"""

from __future__ import annotations

import json
from pathlib import Path

from results import report_rows, run_shipped, table, write_section


def main() -> None:
    record, _ = run_shipped("balance")
    synth = json.loads((Path(record["nodes"]["synth"]["outputs"]["dataset"]) / "report.json")
                       .read_text())
    rows = report_rows(record)
    task, counts = next(iter(synth.items()))
    value = {(r["model"], r["metric"]): r["value"] for r in rows if r["task"] == task}
    models = ["majority", "imbalanced", "balanced"]
    metrics = ["accuracy", "macro_f1", *(f"f1_{label}" for label in counts["before"])]
    scores = table(["metric", *models],
                   [[m, *(f"{value[(x, m)]:.3f}" if (x, m) in value else "" for x in models)]
                    for m in metrics])
    made = table(["label", "real (train)", "synthetic", "total"],
                 [[label, str(n), str(counts["after"][label] - n), str(counts["after"][label])]
                  for label, n in counts["before"].items()])
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(counts["rejected"].items())) or "none"
    write_section("Synthetic balancing", "python benchmarks/balance.py",
                  f"pipelines/balance.yaml, run {record['run_id']}: nano GPT on builtin:reviews; "
                  "classifiers scored by label likelihood on the balanced test split "
                  f"({int(value.get(('imbalanced', 'instances'), 0))} instances). Generated "
                  f"{counts['generated']}, kept {counts['kept']} (rejected: {rejected}).",
                  scores + "\n\n" + made)


if __name__ == "__main__":
    main()
