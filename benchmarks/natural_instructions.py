"""Instruction tuning on a real Natural Instructions task: pipelines/natural-instructions.yaml
on one task file (default: the 4-class sentiment task823), base vs fine-tuned vs the
majority-class and random baselines on its held-out test split. Writes the
"Natural Instructions" section of RESULTS.md.

    python benchmarks/natural_instructions.py [--store DIR] [--set vars.tasks=FILE]
"""

from __future__ import annotations

from pathlib import Path

from results import ni_task, report_rows, run_shipped, table, write_section


def main() -> None:
    record, overrides = run_shipped("natural-instructions", [f"vars.tasks={ni_task('task823')[0]}"])
    rows = report_rows(record)
    task = Path([o for o in overrides if o.startswith("vars.tasks=")][-1].partition("=")[2]).stem
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
