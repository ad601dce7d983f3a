"""Runner overhead: a 50-node pipeline of no-op nodes, timed as a user sees it.

Measures the wall time of `gptflow validate`, a first `gptflow run`, a fully
cached re-run and `gptflow plan`, each as a fresh process, beside the reference
floor: a Python process that only imports gptflow's CLI module (what any Python
CLI pays before doing work). Writes benchmarks/RESULTS.md's runner section.

    python benchmarks/runner_overhead.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import table, write_section

NODES = 50
REPEATS = 5


def pipeline_text(n: int) -> str:
    lines = ["name: overhead", "nodes:"]
    for i in range(n):  # a chain of layers, four nodes wide: real edges, real parallelism
        after = [f"n{j}" for j in range(max(0, i - 4 - i % 4), i - i % 4)] if i >= 4 else []
        lines.append(f"  n{i}: {{plugin: noop, params: {{index: {i}}}, "
                     f"inputs: {{after: {after}}}}}")
    return "\n".join(lines) + "\n"


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    env = {**os.environ, "GPTFLOW_PLUGINS": "noop_nodes", "GPTFLOW_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": str(Path(__file__).parent)}
    gptflow = [sys.executable, "-m", "gptflow.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "p.yaml").write_text(pipeline_text(NODES))
        floor = statistics.median(timed([sys.executable, "-c", "import gptflow.cli"], cwd, env)
                                  for _ in range(REPEATS))
        validate = statistics.median(timed([*gptflow, "validate", "p.yaml"], cwd, env)
                                     for _ in range(REPEATS))
        first = timed([*gptflow, "run", "p.yaml"], cwd, env)
        cached = statistics.median(timed([*gptflow, "run", "p.yaml"], cwd, env)
                                   for _ in range(REPEATS))
        plan = statistics.median(timed([*gptflow, "plan", "p.yaml"], cwd, env)
                                 for _ in range(REPEATS))
        parallel = timed([*gptflow, "run", "p.yaml", "--force", "--jobs", "2"], cwd, env)
    rows = [
        ("python -c 'import gptflow.cli' (reference floor)", floor, "", ""),
        (f"gptflow validate ({NODES} nodes)", validate, f"{validate / floor:.2f}x", "< 0.5 s"),
        (f"gptflow plan ({NODES} nodes)", plan, f"{plan / floor:.2f}x", ""),
        (f"gptflow run, first ({NODES} nodes ran)", first, f"{first / floor:.2f}x", ""),
        (f"gptflow run, fully cached ({NODES} nodes)", cached, f"{cached / floor:.2f}x", "< 1 s"),
        (f"gptflow run --force --jobs 2 ({NODES} nodes)", parallel, f"{parallel / floor:.2f}x", ""),
    ]
    write_section("Runner overhead", "python benchmarks/runner_overhead.py",
                  f"Medians of {REPEATS} fresh processes (first run and --jobs 2: one).",
                  table(["what", "wall (s)", "vs floor", "target"],
                        [[what, f"{t:.3f}", ratio, target] for what, t, ratio, target in rows]))


if __name__ == "__main__":
    main()
