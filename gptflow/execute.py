"""Execute one node: under its fingerprint's lock, into a staging folder that
the store publishes atomically, with its output sent to its log file. Results
and progress go to a ``report`` callback as typed events, so the same code runs
in the runner's process and in a worker process.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptflow.errors import NodeError, one_line
from gptflow.manager import Plugins
from gptflow.memory import PeakMemory
from gptflow.nodes import Artifact
from gptflow.plan import Step
from gptflow.records import NodeRecord, NodeStatus
from gptflow.store import CorruptArtifact, Store, now


@dataclass(frozen=True)
class Progress:
    completed: float
    total: float | None
    text: str


@dataclass(frozen=True)
class Waiting:
    """Another run holds the node's lock."""


@dataclass(frozen=True)
class Done:
    status: NodeStatus  # ran, or cached (another run made it meanwhile)
    metrics: dict[str, Any]
    duration_s: float | None = None
    peak_mem_bytes: int | None = None
    warnings: tuple[str, ...] = ()  # what the node told the user (context.warn)


@dataclass(frozen=True)
class Failed:
    error: str  # one line

    @classmethod
    def corrupt(cls, error: Exception, node: str) -> Failed:
        return cls(f"corrupt artifact: {error}; re-run with --force {node}")


Event = Progress | Waiting | Done | Failed
Report = Callable[[Event], None]


@dataclass
class Job:
    """Everything a worker needs to run one node (picklable)."""

    run_id: str
    node: str
    plugin: str
    params: dict[str, Any]
    fingerprint: str
    manifest: dict[str, Any]
    inputs: dict[str, Any]  # slot -> Artifact | list[Artifact] | None
    outputs: dict[str, str]
    store_root: str
    log_path: str
    log_dir: str  # outlives the node: tracker files
    tracking: dict[str, Any]  # the run's trackers, name -> options
    force: bool


class NodeContext:
    """The concrete :class:`gptflow.Context` handed to a node's run()."""

    def __init__(self, job: Job, staging: Path, store: Store, plugins: Plugins,
                 report: Report, log: logging.Logger) -> None:
        self.node = job.node
        self.fingerprint = job.fingerprint
        self.work_dir = store.work_dir(job.fingerprint)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(job.log_dir)
        self.log = log
        self._job = job
        self.meta: dict[str, dict[str, Any]] = {name: {} for name in job.outputs}
        self.warnings: list[str] = []
        self._staging, self._plugins, self._report = staging, plugins, report

    def output_dir(self, name: str) -> Path:
        if name not in self.meta:
            raise KeyError(f"node {self.node!r} has no output {name!r}")
        return self._staging / name

    def progress(self, completed: float, total: float | None = None, text: str = "") -> None:
        self._report(Progress(completed, total, text))

    def warn(self, message: str) -> None:
        self.log.warning("%s", message)
        self.warnings.append(message)

    def set_meta(self, output: str, **meta: Any) -> None:
        self.meta[output].update(meta)

    def training_callbacks(self) -> list[Any]:
        job = self._job
        return self._plugins.training_callbacks(job.node, job.run_id, job.tracking, job.log_dir)


def execute(job: Job, plugins: Plugins, report: Report) -> None:
    """Run one node under its lock and publish it; report Done or Failed."""
    store = Store(job.store_root)
    with store.lock(job.fingerprint, on_wait=lambda: report(Waiting())):
        if store.has(job.fingerprint) and not job.force:  # another run made it meanwhile
            try:
                report(Done(NodeStatus.CACHED, store.node_record(job.fingerprint).metrics))
            except CorruptArtifact as e:
                report(Failed.corrupt(e, job.node))
            return
        if job.force:  # recompute from scratch, not from an old checkpoint
            shutil.rmtree(store.work_dir(job.fingerprint), ignore_errors=True)
        staging = store.stage(job.fingerprint, job.run_id)
        for name in job.outputs:
            (staging / name).mkdir()
        log = node_logger(job)
        started = time.perf_counter()
        try:
            metrics, context, peak = run_node(job, plugins, store, staging, report, log)
            check_outputs(staging, job.outputs)
            check_inputs(store, job.inputs)
            duration = time.perf_counter() - started
            metrics.setdefault("peak_mem_bytes", peak)
            record = NodeRecord(node=job.node, plugin=job.plugin,
                                version=job.manifest["version"], run_id=job.run_id,
                                fingerprint=job.fingerprint, manifest=job.manifest,
                                metrics=metrics, duration_s=duration, created=now())
            store.publish(staging, job.fingerprint, record,
                          {n: (t, context.meta[n]) for n, t in job.outputs.items()})
            shutil.rmtree(store.work_dir(job.fingerprint), ignore_errors=True)  # resume state
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            log.error("%s", traceback.format_exc())
            if isinstance(e, Exception):
                report(Failed(one_line(e)))
                return
            raise
        finally:
            for handler in list(log.handlers):
                handler.close()
                log.removeHandler(handler)
        report(Done(NodeStatus.RAN, metrics, duration, peak, tuple(context.warnings)))


def run_node(job: Job, plugins: Plugins, store: Store, staging: Path, report: Report,
             log: logging.Logger) -> tuple[dict[str, Any], NodeContext, int]:
    """Call the node's run() with its output going to the log; returns
    (metrics, context, peak resident bytes)."""
    with _redirect_output(job.log_path), PeakMemory() as peak:
        node_type = plugins.node_types[job.plugin].node_type
        params = node_type.params.model_validate(job.params)
        context = NodeContext(job, staging, store, plugins, report, log)
        result = node_type.run(context, job.inputs, params)
    return plain_metrics(result, job.plugin), context, peak.bytes


def plain_metrics(result: Any, plugin: str) -> dict[str, Any]:
    """A node's metrics as JSON values, checked the moment run() returns: numpy and
    torch scalars become plain numbers; anything else names its key."""
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise NodeError(f"run() of node type {plugin!r} returned a {type(result).__name__}, "
                        "not a mapping of metric names to values (or None)")
    return {str(key): _plain(value, str(key), plugin) for key, value in result.items()}


def _plain(value: Any, key: str, plugin: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{key}.{k}", plugin) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{key}[{i}]", plugin) for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy scalars, 0-d arrays and tensors
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return _plain(item(), key, plugin)
    raise NodeError(f"node type {plugin!r}: metric {key!r} is a {type(value).__name__}, "
                    "not a number, string, list or mapping of them")


def check_outputs(staging: Path, outputs: Mapping[str, str]) -> None:
    """Only files under the declared output folders are published, and no link
    that points outside them."""
    stray = sorted(p.name for p in staging.iterdir() if p.name not in outputs)
    if stray:
        raise NodeError(f"wrote {', '.join(stray)} beside its output folders; only files "
                        "under context.output_dir(name) are published")
    for name in outputs:
        folder = staging / name
        if not any(folder.iterdir()):
            raise NodeError(f"wrote nothing to output {name!r}")
        for path in folder.rglob("*"):
            if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
                raise NodeError(f"output {name!r}: {path.relative_to(folder)} links outside "
                                f"it (to {os.readlink(path)})")


def check_inputs(store: Store, inputs: Mapping[str, Any]) -> None:
    """Input artifacts are read-only to a node: one it changed fails it."""
    for slot, value in inputs.items():
        for artifact in value if isinstance(value, list) else [value]:
            if artifact is None:
                continue
            try:
                store.artifact(artifact.path)
            except CorruptArtifact as e:
                raise NodeError(f"changed its input {slot!r}: {e}") from None


def node_logger(job: Job) -> logging.Logger:
    log = logging.getLogger(f"gptflow.node.{job.node}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(job.log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


@contextmanager
def _redirect_output(log_path: str) -> Iterator[None]:
    """Send everything the node prints (Lightning, warnings) to its log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def make_job(run_id: str, step: Step, inputs: dict[str, Any], store: Store, log: str,
             log_dir: Path, tracking: dict[str, Any]) -> Job:
    return Job(run_id, step.node.name, step.node.plugin, step.node.params.model_dump(mode="json"),
               step.fingerprint, step.manifest, inputs, dict(step.node.node_type.outputs),
               str(store.root), log, str(log_dir), tracking, step.reason == "forced")


def resolve_inputs(step: Step, store: Store, fingerprints: dict[str, str]) -> dict[str, Any]:
    """Slot -> verified upstream artifact(s), as the node's run() receives them."""
    inputs: dict[str, Any] = {}
    for slot, spec in step.node.node_type.inputs.items():
        arts: list[Artifact] = [store.outputs(fingerprints[r.node])[r.output]
                                for r in step.node.inputs.get(slot, [])]
        inputs[slot] = arts if spec.many else (arts[0] if arts else None)
    return inputs
