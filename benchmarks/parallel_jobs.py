"""Two training nodes at once: ``--jobs 2`` vs one after the other, on all cores.

pipelines/shakespeare-char.yaml's two independent pretrain nodes (modern and
classic), its tokenize node cached: run one after the other in the runner's
process (``--jobs 1``, every core to each), then both at once in two workers
(``--jobs 2``, each its share of the cores). Rounds alternate the two; medians
of the wall time of the whole run. Writes the "Parallel training nodes"
section of RESULTS.md.

    python benchmarks/parallel_jobs.py [--steps 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from results import run_pipeline, table, write_section

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "shakespeare-char.yaml"
NODES = ("modern", "classic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    overrides = [f"vars.steps={args.steps}"]
    walls: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        run_pipeline(PIPELINE, overrides, store, only=("chars",))
        for _ in range(args.rounds):
            for jobs in (1, 2):
                start = time.perf_counter()
                record = run_pipeline(PIPELINE, overrides, store, jobs=jobs, force=NODES)
                walls[jobs].append(time.perf_counter() - start)
                assert all(record["nodes"][n]["status"] == "ran" for n in NODES), record
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    write_section(
        "Parallel training nodes", "python benchmarks/parallel_jobs.py",
        f"pipelines/shakespeare-char.yaml, its two pretrain nodes at {args.steps} steps each "
        f"(tokenize cached); wall time of the whole run, medians of {args.rounds} "
        "alternating rounds. Target: --jobs 2 <= 1.1x one after the other.",
        table(["how", "wall (s)", "vs one after the other"],
              [["one after the other (--jobs 1)", f"{one:.1f}", "1.00x"],
               ["both at once (--jobs 2)", f"{two:.1f}", f"{two / one:.2f}x"]]))


if __name__ == "__main__":
    main()
