"""Execute one node: under its fingerprint's lock, into a staging folder that
the store publishes atomically, with its output sent to its log file. Results
and progress go to a ``report`` callback as typed events, so the same code runs
in the runner's process and in a worker process.
"""

from __future__ import annotations

import copy
import dataclasses
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

from pydantic import BaseModel

from gptflow.errors import NodeError, one_line
from gptflow.manager import Plugins
from gptflow.memory import PeakMemory
from gptflow.nodes import path_refs
from gptflow.plan import Step
from gptflow.records import NodeRecord, NodeStatus
from gptflow.sources import resolve_path
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
    """One node to compute, as data: what any executor ships to a worker (pickled to
    a local worker process, or as JSON, the job spec, to ``gptflow exec-node``).
    It holds no path: a worker finds the store where its machine mounts it."""

    run_id: str
    node: str
    plugin: str
    params: dict[str, Any]
    fingerprint: str
    manifest: dict[str, Any]
    inputs: dict[str, list[list[str]]]  # slot -> [producer fingerprint, output] of each
    outputs: dict[str, str]
    tracking: dict[str, Any]  # the run's trackers, name -> options
    force: bool
    resources: dict[str, Any]  # what the node asks of an executor (cpus, gpus, memory)
    versions: dict[str, str]  # of gptflow and of the node type's provider, on the driver
    plugins: list[str]  # plugin modules the driver loaded by name (GPTFLOW_PLUGINS)
    folder: str  # the pipeline's folder, relative to the store: relative paths start there

    def to_json(self) -> dict[str, Any]:
        return {"format_version": JOB_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        if data.get("format_version") != JOB_FORMAT:
            raise ValueError(f"job spec format {data.get('format_version')!r}, this gptflow "
                             f"reads {JOB_FORMAT}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


JOB_FORMAT = 1


def event_json(event: Event) -> dict[str, Any]:
    """An event as one JSON line of a node's event stream (``gptflow exec-node``)."""
    return {"event": type(event).__name__, **dataclasses.asdict(event)}


def event_from_json(data: Mapping[str, Any]) -> Event:
    kind = {c.__name__: c for c in (Progress, Waiting, Done, Failed)}[data["event"]]
    fields = {k: v for k, v in data.items() if k != "event"}
    if kind is Done:
        fields["status"] = NodeStatus(fields["status"])
        fields["warnings"] = tuple(fields["warnings"])
    event: Event = kind(**fields)
    return event


class NodeContext:
    """The concrete :class:`gptflow.Context` handed to a node's run()."""

    def __init__(self, job: Job, staging: Path, store: Store, plugins: Plugins,
                 report: Report, log: logging.Logger) -> None:
        self.node = job.node
        self.fingerprint = job.fingerprint
        self.work_dir = store.work_dir(job.fingerprint)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = store.logger_dir(job.run_id, job.node)
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
        return self._plugins.training_callbacks(job.node, job.run_id, job.tracking,
                                                str(self.log_dir))


def execute(job: Job, plugins: Plugins, store: Store, report: Report) -> None:
    """Run one node under its lock and publish it; report Done or Failed."""
    with store.lock(job.fingerprint, on_wait=lambda: report(Waiting())):
        try:
            if store.has(job.fingerprint) and not job.force:  # another run made it meanwhile
                report(Done(NodeStatus.CACHED, store.node_record(job.fingerprint).metrics))
                return
            inputs = resolve_inputs(job, plugins, store)
        except CorruptArtifact as e:
            report(Failed.corrupt(e, job.node))
            return
        if job.force:  # recompute from scratch, not from an old checkpoint
            shutil.rmtree(store.work_dir(job.fingerprint), ignore_errors=True)
        staging = store.stage(job.fingerprint, job.run_id)
        for name in job.outputs:
            (staging / name).mkdir()
        log_path = store.node_log(job.run_id, job.node)
        log = node_logger(job, log_path)
        started = time.perf_counter()
        try:
            metrics, context, peak = run_node(job, inputs, plugins, store, staging, report,
                                              log_path, log)
            check_outputs(staging, job.outputs)
            check_inputs(store, inputs)
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


def run_node(job: Job, inputs: dict[str, Any], plugins: Plugins, store: Store, staging: Path,
             report: Report, log_path: Path, log: logging.Logger
             ) -> tuple[dict[str, Any], NodeContext, int]:
    """Call the node's run() with its output going to the log; returns
    (metrics, context, peak resident bytes)."""
    with _redirect_output(log_path), PeakMemory() as peak:
        node_type = plugins.node_types[job.plugin].node_type
        params = resolved_params(node_type.params, job.params, store.root / job.folder)
        context = NodeContext(job, staging, store, plugins, report, log)
        result = node_type.run(context, inputs, params)
    return plain_metrics(result, job.plugin), context, peak.bytes


def resolved_params(model: type[BaseModel], params: dict[str, Any], folder: Path) -> BaseModel:
    """The params a node's run() gets: every relative path taken from the pipeline's
    folder (the fingerprint keeps them as written)."""
    data = copy.deepcopy(params)
    for loc, value, _ in path_refs(model.model_validate(params)):
        target: Any = data
        for key in loc[:-1]:
            target = target[key]
        target[loc[-1]] = resolve_path(value, folder.resolve())
    return model.model_validate(data)


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


def node_logger(job: Job, path: Path) -> logging.Logger:
    log = logging.getLogger(f"gptflow.node.{job.node}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


@contextmanager
def _redirect_output(log_path: Path) -> Iterator[None]:
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


def make_job(run_id: str, step: Step, upstream: Mapping[str, str], plugins: Plugins,
             store: Store, tracking: dict[str, Any]) -> Job:
    """``upstream``: the fingerprint of each node the step reads from."""
    node = step.node
    inputs = {slot: [[upstream[r.node], r.output] for r in refs]
              for slot, refs in node.inputs.items()}
    return Job(run_id, node.name, node.plugin, node.params.model_dump(mode="json"),
               step.fingerprint, step.manifest, inputs, dict(node.node_type.outputs), tracking,
               step.reason == "forced", node.resources.model_dump(mode="json"),
               plugins.versions(node.plugin), list(plugins.extra_modules),
               os.path.relpath(node.folder, store.root))


def resolve_inputs(job: Job, plugins: Plugins, store: Store) -> dict[str, Any]:
    """Slot -> verified upstream artifact(s), as the node's run() receives them."""
    inputs: dict[str, Any] = {}
    for slot, spec in plugins.node_types[job.plugin].node_type.inputs.items():
        arts = [store.outputs(fp)[output] for fp, output in job.inputs.get(slot, [])]
        inputs[slot] = arts if spec.many else (arts[0] if arts else None)
    return inputs
