"""Instruction tuning on a real Natural Instructions task: pipelines/natural-instructions.yaml
on one task file (default: the 4-class sentiment task823), base vs fine-tuned vs the
majority-class and random baselines on its held-out test split. Writes the
"Natural Instructions" section of RESULTS.md.

    python benchmarks/natural_instructions.py [--task FILE] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from results import run_pipeline, table, write_section

ROOT = Path(__file__).resolve().parents[1]
TASK = (ROOT.parent / "shared" / "data" / "natural-instructions"
        / "task823_peixian-rtgender_sentiment_analysis.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", type=Path, default=TASK)
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        record = run_pipeline(ROOT / "pipelines" / "natural-instructions.yaml",
                              [f"vars.tasks={args.task}"], args.store or Path(tmp) / "store")
        report = Path(record["nodes"]["eval"]["outputs"]["report"])
        rows = json.loads((report / "report.json").read_text())["rows"]
    task = args.task.stem
    value = {(r["model"], r["metric"]): r["value"] for r in rows if r["task"] == task}
    models = ["majority", "random", "base", "sft"]
    metrics = [m for m in dict.fromkeys(r["metric"] for r in rows if r["task"] == task)]
    rows = [[m] + [f"{value[(x, m)]:.3f}" if (x, m) in value else "" for x in models]
            for m in metrics]
    write_section(f"Natural Instructions: {task}", "python benchmarks/natural_instructions.py",
                  "pipelines/natural-instructions.yaml: nano GPT pretrained on python-docs + the "
                  "task's inputs, instruction-tuned on its train split, scored on its test split "
                  f"by label likelihood. Run {record['run_id']}.",
                  table(["metric", *models], rows))


if __name__ == "__main__":
    main()
