"""What the user sees while a pipeline runs: one line per node, a live progress
display for long nodes (on a terminal), and a summary table at the end."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from gptflow.records import NodeStatus, RunRecord, RunStatus

STYLE = {NodeStatus.RAN: "green", RunStatus.OK: "green", NodeStatus.CACHED: "cyan",
         NodeStatus.FAILED: "bold red", RunStatus.FAILED: "bold red",
         NodeStatus.SKIPPED: "yellow", NodeStatus.INTERRUPTED: "bold red",
         RunStatus.INTERRUPTED: "bold red", NodeStatus.RUNNING: "magenta",
         RunStatus.RUNNING: "magenta", RunStatus.KILLED: "bold red", NodeStatus.PENDING: "dim"}
MARK = {NodeStatus.RAN: "✓", NodeStatus.CACHED: "○", NodeStatus.SKIPPED: "-"}


HEADLINE = ("val_loss", "accuracy", "macro_f1", "train_loss", "tokens_per_s", "mfu", "params",
            "trainable_params", "bytes_on_disk")


def styled(status: NodeStatus | RunStatus) -> str:
    return f"[{STYLE.get(status, 'default')}]{status.value}[/]"


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
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


class Display:
    """Status lines and live progress; plain lines when not on a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
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

    def update(self, node: str, completed: float, total: float | None, text: str) -> None:
        if node in self.tasks:
            self.progress.update(self.tasks[node], completed=completed, total=total,
                                 description=text)

    def finished(self, node: str, status: NodeStatus, detail: str) -> None:
        if node in self.tasks:
            self.progress.remove_task(self.tasks.pop(node))
        self.line(f"[{STYLE.get(status, 'default')}]{MARK.get(status, '✗')} {node}[/] {detail}")

    def summary(self, record: RunRecord) -> None:
        self.console.print(summary_table(record))


def summary_table(record: RunRecord) -> Table:
    """Node, status, duration and headline metrics of one run."""
    table = Table(title=f"run {record.run_id} · {record.pipeline.name} · "
                        f"{styled(record.status)}", title_justify="left")
    for col in ("node", "plugin", "status", "time", "metrics"):
        table.add_column(col, overflow="fold")
    for name, node in record.nodes.items():
        metrics = node.metrics
        first = [k for k in HEADLINE if k in metrics]
        keys = (first + [k for k in metrics if k not in HEADLINE and k != "peak_mem_bytes"])[:6]
        shown = ", ".join(f"{k}={fmt_metric(metrics[k])}" for k in keys)
        duration = node.duration_s
        table.add_row(name, node.plugin, styled(node.status),
                      fmt_duration(duration) if duration is not None else "", shown)
    return table
