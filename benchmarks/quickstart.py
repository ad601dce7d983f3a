"""The quickstart as a new user runs it: `gptflow run pipelines/quickstart.yaml` in a
fresh process on an empty store, timed from the command to its exit, beside a fixed
reference computation timed in the same run (before and after), so that a slow
machine shows as a slow reference rather than as a regression. Target: under 300 s
on 2 CPU cores.

``--against REV`` also runs the quickstart's ``base`` pretrain node (with its
tokenizer) at git revision REV and at the working tree, interleaved, ``--rounds``
times: the test of "is it the code or the machine".

    python benchmarks/quickstart.py [--against REV --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import table, write_section

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 300.0


def reference() -> float:
    """Seconds for a fixed piece of work that involves no gptflow code: 1,200 fp32
    matmuls of 384 x 384 (one thread, as a training step's small ones are) and a
    pure-Python loop of 3M iterations."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(1200):
        b = a @ a
        a = b / b.norm()
    total = 0
    for i in range(3_000_000):
        total += i % 7
    torch.set_num_threads(threads)
    return time.perf_counter() - start


def quickstart(root: Path, store: Path, only: tuple[str, ...] = ()) -> tuple[float, dict]:
    """Wall seconds of ``gptflow run pipelines/quickstart.yaml`` run from ``root`` (the
    code there, on PYTHONPATH), and its run.json."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'plugins'}",
           "GPTFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    args = [sys.executable, "-m", "gptflow.cli", "run", "pipelines/quickstart.yaml",
            "--store", str(store), *(["--only", *only] if only else [])]
    start = time.perf_counter()
    subprocess.run(args, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    runs = sorted((store / "runs").glob("*/run.json"))
    return seconds, json.loads(runs[-1].read_text())


def node_seconds(record: dict, node: str) -> float:
    return float(record["nodes"][node]["duration_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", metavar="REV", help="an older revision to compare "
                        "the pretrain node with, interleaved")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = reference()
        seconds, record = quickstart(ROOT, Path(tmp) / "store")
        after = reference()
        compared = compare(args.against, args.rounds, Path(tmp)) if args.against else ""
    ref = statistics.median([before, after])
    rows = [[name, f"{node['duration_s']:.1f}"] for name, node in record["nodes"].items()]
    body = table(["node", "seconds"], rows) + "\n\n" + table(
        ["quickstart, command to exit", "reference (before / after)", "quickstart / reference",
         "target"],
        [[f"**{seconds:.0f} s**", f"{before:.2f} s / {after:.2f} s", f"{seconds / ref:.0f}x",
          f"< {TARGET_S:.0f} s: {'met' if seconds < TARGET_S else 'NOT met'}"]])
    write_section(
        "Quickstart", "python benchmarks/quickstart.py" + (
            f" --against {args.against} --rounds {args.rounds}" if args.against else ""),
        "`gptflow run pipelines/quickstart.yaml` in a fresh process on an empty store, "
        "timed from the command to its exit; the reference is a fixed computation with "
        "no gptflow code (1,200 one-thread 384x384 matmuls and a 3M-step Python loop), "
        "timed before and after it: a busy or slow machine shows in it.",
        body + compared)


def compare(rev: str, rounds: int, tmp: Path) -> str:
    """The quickstart's tokenize + pretrain at ``rev`` and here, interleaved."""
    old = tmp / "old"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        times: dict[str, list[float]] = {rev: [], "working tree": []}
        for r in range(rounds):
            for name, root in ((rev, old), ("working tree", ROOT)):
                _, record = quickstart(root, tmp / f"store-{r}-{name.replace(' ', '-')}",
                                       only=("tok", "base"))
                times[name].append(node_seconds(record, "base"))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT,
                       capture_output=True)
    rows = [[name, ", ".join(f"{t:.0f}" for t in ts), f"{statistics.median(ts):.0f}"]
            for name, ts in times.items()]
    ratio = statistics.median(times["working tree"]) / statistics.median(times[rev])
    return ("\n\nThe `base` pretrain node (300 steps of the nano model) at "
            f"{rev} and in the working tree, interleaved, {rounds} rounds:\n\n"
            + table(["code", "seconds by round", "median"], rows)
            + f"\n\nworking tree / {rev}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
