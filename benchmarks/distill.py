"""Distillation: pipelines/distill.yaml — a student of about a quarter of the
teacher's size, distilled from it vs trained from scratch with the same steps,
data and optimizer; validation perplexity of all three on the same held-out
tokens. Writes the "Distillation" section of RESULTS.md.

    python benchmarks/distill.py [--store DIR] [--set PATH=VALUE ...]
"""

from __future__ import annotations

from results import report_rows, run_shipped, table, write_section


def main() -> None:
    record, overrides = run_shipped("distill")
    nodes = record["nodes"]
    rows = report_rows(record)
    value = {(r["model"], r["metric"]): r["value"] for r in rows}
    body = table(
        ["model", "params", "steps", "val perplexity", "gen tokens/s", "node time (s)"],
        [[name, f"{value[(name, 'params')]:,}", str(nodes[name]["metrics"]["steps"]),
          f"{value[(name, 'perplexity')]:.2f}", f"{value[(name, 'gen_tokens_per_s')]:.0f}",
          f"{nodes[name]['duration_s'] or 0:.0f}"]
         for name in ("teacher", "distilled", "scratch")])
    settings = ", ".join(overrides) or "defaults"
    write_section("Distillation", " ".join(["python benchmarks/distill.py",
                                            *(f"--set {o}" for o in overrides)]),
                  f"pipelines/distill.yaml ({settings}), run {record['run_id']}: alpha 0.5, "
                  "T 2; perplexity by evaluate on the tokens' validation split; node time 0: "
                  "cached.",
                  body)


if __name__ == "__main__":
    main()
