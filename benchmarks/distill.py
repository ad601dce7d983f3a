"""Distillation: pipelines/distill.yaml — a student of about a quarter of the
teacher's size, distilled from it vs trained from scratch with the same steps,
data and optimizer; validation perplexity of all three on the same held-out
tokens. Writes the "Distillation" section of RESULTS.md.

    python benchmarks/distill.py [--store DIR] [--set vars.steps=N ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from results import run_pipeline, table, write_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        record = run_pipeline(ROOT / "pipelines" / "distill.yaml", args.overrides,
                              args.store or Path(tmp) / "store")
        nodes = record["nodes"]
        rows = json.loads((Path(nodes["eval"]["outputs"]["report"]) / "report.json")
                          .read_text())["rows"]
    value = {(r["model"], r["metric"]): r["value"] for r in rows}
    body = table(
        ["model", "params", "steps", "val perplexity", "gen tokens/s", "node time (s)"],
        [[name, f"{value[(name, 'params')]:,}", str(nodes[name]["metrics"]["steps"]),
          f"{value[(name, 'perplexity')]:.2f}", f"{value[(name, 'gen_tokens_per_s')]:.0f}",
          f"{nodes[name]['duration_s']:.0f}"]
         for name in ("teacher", "distilled", "scratch")])
    settings = ", ".join(args.overrides) or "defaults"
    write_section("Distillation", "python benchmarks/distill.py " + " ".join(
                      f"--set {o}" for o in args.overrides),
                  f"pipelines/distill.yaml ({settings}), run {record['run_id']}: alpha 0.5, "
                  "T 2; perplexity over the whole validation split of the tokens.", body)


if __name__ == "__main__":
    main()
