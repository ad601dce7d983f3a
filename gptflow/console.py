"""What the user sees while a pipeline runs: one line per node, a live progress
display for long nodes (on a terminal; in a pipe or a log, a progress line per
node every ``$GPTFLOW_PROGRESS_EVERY`` seconds, 20 by default), and a summary
table at the end."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from gptflow.records import NodeStatus, RunRecord, RunStatus

STYLE = {"ran": "green", "ok": "green", "cached": "cyan", "failed": "bold red",
         "skipped": "yellow", "interrupted": "bold red", "running": "magenta",
         "killed": "bold red", "pending": "dim"}  # by status value, node's or run's
MARK = {NodeStatus.RAN: "✓", NodeStatus.CACHED: "○", NodeStatus.SKIPPED: "-"}


HEADLINE = ("val_loss", "accuracy", "macro_f1", "tokens_per_s", "params", "bytes_on_disk")
"""Shown for node types that declare no headline metrics of their own."""
SHOWN = 4  # headline metrics per node: three lines at most in 80 columns
PROGRESS_EVERY_S = 20.0


def progress_every() -> float:
    """Seconds between progress lines in a log: $GPTFLOW_PROGRESS_EVERY, else 20."""
    try:
        return max(float(os.environ.get("GPTFLOW_PROGRESS_EVERY", PROGRESS_EVERY_S)), 0.0)
    except ValueError:
        return PROGRESS_EVERY_S


def styled(status: NodeStatus | RunStatus) -> str:
    return f"[{STYLE.get(status.value, 'default')}]{status.value}[/]"


@contextlib.contextmanager
def private_console() -> Iterator[Console]:
    """A console on a private copy of stdout, so that node output redirected into
    log files never mixes with ours."""
    sys.stdout.flush()
    try:
        own = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (OSError, ValueError):  # no real file descriptor (e.g. captured in tests)
        yield Console(highlight=False, soft_wrap=True)
        return
    with own:
        yield Console(file=own, highlight=False, soft_wrap=True)


def fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_metric(value: Any) -> str:
    """Short and unbreakable: 4 significant digits, k/M/G for large counts."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value).replace(" ", "\u00a0")
    for threshold, scale, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Display:
    """Status lines and live progress; plain lines when not on a terminal, a
    progress line among them every ``every`` seconds for each running node."""

    def __init__(self, console: Console, every: float | None = None) -> None:
        self.console = console
        self.every = progress_every() if every is None else every
        self.clock: dict[str, tuple[float, float]] = {}  # node -> (started, last line)
        self.progress = Progress(TextColumn("  [magenta]{task.fields[node]}"), BarColumn(),
                                 TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=console)
        self.tasks: dict[str, TaskID] = {}
        self.live: Live | None = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.live = Live(self.progress, console=self.console, refresh_per_second=4,
                             transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.__exit__(None, None, None)

    def line(self, text: str) -> None:
        self.console.print(text)

    def started(self, node: str, plugin: str, reason: str) -> None:
        self.line(f"[magenta]●[/] {node} [dim]({plugin})[/] running: {reason}")
        self.tasks[node] = self.progress.add_task("", node=node, total=None)
        self.clock[node] = (time.monotonic(), time.monotonic())

    def update(self, node: str, completed: float, total: float | None, text: str) -> None:
        if node in self.tasks:
            self.progress.update(self.tasks[node], completed=completed, total=total,
                                 description=text)
        if self.live is None and node in self.clock:
            started, last = self.clock[node]
            now = time.monotonic()
            if now - last >= self.every:
                self.clock[node] = started, now
                line = progress_line(completed, total, text, now - started)
                self.line(f"  [magenta]{node}[/] {escape(line)}")

    def finished(self, node: str, status: NodeStatus, detail: str) -> None:
        if node in self.tasks:
            self.progress.remove_task(self.tasks.pop(node))
        self.clock.pop(node, None)
        style = STYLE.get(status.value, "default")
        self.line(f"[{style}]{MARK.get(status, '✗')} {node}[/] {detail}")

    def summary(self, record: RunRecord, headlines: Mapping[str, tuple[str, ...]]) -> None:
        self.console.print(summary_table(record, headlines))
        for name, text in reports(record):
            self.console.print(f"\n[bold]{name}[/]\n{text}")


def progress_line(completed: float, total: float | None, text: str, elapsed: float) -> str:
    """``step 120 loss 3.214 · 120/300 (40%) · 42.1 s, ETA 1 min 03 s``: the node's own
    text, how far it is, and how long it has left at its pace so far."""
    done = f"{completed:g}/{total:g} ({completed / total:.0%})" if total else \
        "" if text else f"{completed:g}"
    eta = f", ETA {fmt_duration(elapsed * (total - completed) / completed)}" \
        if total and completed > 0 else ""
    return " · ".join(p for p in (text, done, fmt_duration(elapsed) + eta) if p)


def summary_table(record: RunRecord, headlines: Mapping[str, tuple[str, ...]]) -> Table:
    """Node, status, duration and the headline metrics each node type declares
    (``headlines``: plugin -> metric names), fitted to the console's width: a
    metric wraps as a whole, never inside its value."""
    table = Table(title=f"run {record.run_id} · {record.pipeline.name} · "
                        f"{styled(record.status)}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("node", overflow="ellipsis", no_wrap=True, max_width=16)
    table.add_column("status", no_wrap=True, max_width=11)
    table.add_column("time", no_wrap=True, justify="right", max_width=10)
    table.add_column("metrics", overflow="fold", min_width=24)
    for name, node in record.nodes.items():
        metrics = node.metrics
        keys = [k for k in headlines.get(node.plugin) or HEADLINE if k in metrics][:SHOWN]
        shown = "  ".join(f"{k}={fmt_metric(metrics[k])}" for k in keys)
        duration = node.duration_s
        table.add_row(f"{name}\n[dim]{node.plugin}[/]", styled(node.status),
                      fmt_duration(duration) if duration is not None else "", shown)
    return table


def reports(record: RunRecord) -> Iterator[tuple[str, str]]:
    """(node, report.md text) of every output that has one: evaluation tables,
    synthetic-data counts."""
    for name, node in record.nodes.items():
        for output in node.outputs.values():
            table = Path(output) / "report.md"
            if table.is_file():
                yield name, table.read_text(encoding="utf-8")
