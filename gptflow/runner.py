"""Run a planned pipeline: nodes in dependency order, each under its
fingerprint's lock, into a staging folder published atomically.

With ``jobs=1`` nodes run in this process; with ``jobs>1`` independent nodes run
in parallel worker processes (forkserver), which rebuild the plugin manager by
module name and report progress and results over a queue.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptflow.console import Display, fmt_duration
from gptflow.errors import NodeError
from gptflow.manager import Plugins, load_plugins
from gptflow.memory import PeakMemory
from gptflow.nodes import Artifact
from gptflow.pipeline import Pipeline
from gptflow.plan import Step
from gptflow.store import RUN_SCHEMA, CorruptArtifact, Store, now

Report = Callable[[str, Any], None]  # (event, payload)


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
    force: bool


class NodeContext:
    """The concrete :class:`gptflow.Context` handed to a node's run()."""

    def __init__(self, job: Job, staging: Path, store: Store, plugins: Plugins,
                 report: Report, log: logging.Logger) -> None:
        self.node = job.node
        self.fingerprint = job.fingerprint
        self.work_dir = store.work_dir(job.fingerprint)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.meta: dict[str, dict[str, Any]] = {name: {} for name in job.outputs}
        self._staging, self._plugins, self._report = staging, plugins, report

    def output_dir(self, name: str) -> Path:
        if name not in self.meta:
            raise KeyError(f"node {self.node!r} has no output {name!r}")
        return self._staging / name

    def progress(self, completed: float, total: float | None = None, text: str = "") -> None:
        self._report("progress", (completed, total, text))

    def set_meta(self, output: str, **meta: Any) -> None:
        self.meta[output].update(meta)

    def training_callbacks(self) -> list[Any]:
        return self._plugins.training_callbacks(self.node)


def execute(job: Job, plugins: Plugins, report: Report) -> None:
    """Run one node under its lock and publish it; report 'done' or 'failed'."""
    store = Store(job.store_root)
    with store.lock(job.fingerprint, on_wait=lambda: report("waiting", None)):
        if store.has(job.fingerprint) and not job.force:  # another run made it meanwhile
            report("done", {"status": "cached", "metrics": store.node_record(job.fingerprint)
                            .get("metrics", {})})
            return
        if job.force:  # recompute from scratch, not from an old checkpoint
            shutil.rmtree(store.work_dir(job.fingerprint), ignore_errors=True)
        staging = store.stage(job.fingerprint)
        for name in job.outputs:
            (staging / name).mkdir()
        log = _node_logger(job)
        started = time.perf_counter()
        try:
            metrics, context, peak = run_node(job, plugins, store, staging, report, log)
            empty = [n for n in job.outputs if not any((staging / n).iterdir())]
            if empty:
                raise NodeError(f"wrote nothing to output(s) {', '.join(empty)}")
            duration = time.perf_counter() - started
            metrics.setdefault("peak_mem_bytes", peak)
            record = {"node": job.node, "plugin": job.plugin, "version": job.manifest["version"],
                      "run_id": job.run_id, "fingerprint": job.fingerprint,
                      "manifest": job.manifest, "metrics": metrics, "duration_s": duration,
                      "created": now()}
            store.publish(staging, job.fingerprint, record,
                          {n: (t, context.meta[n]) for n, t in job.outputs.items()})
            shutil.rmtree(store.work_dir(job.fingerprint), ignore_errors=True)  # resume state
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            log.error("%s", traceback.format_exc())
            if isinstance(e, Exception):
                report("failed", _one_line(e))
                return
            raise
        finally:
            for handler in list(log.handlers):
                handler.close()
                log.removeHandler(handler)
        report("done", {"status": "ran", "metrics": metrics, "duration_s": duration,
                        "peak_mem_bytes": peak})


def run_node(job: Job, plugins: Plugins, store: Store, staging: Path, report: Report,
             log: logging.Logger) -> tuple[dict[str, Any], NodeContext, int]:
    """Call the node's run() with its output going to the log; returns
    (metrics, context, peak resident bytes)."""
    with _redirect_output(job.log_path), PeakMemory() as peak:
        node_type = plugins.node_types[job.plugin].node_type
        params = node_type.params.model_validate(job.params)
        context = NodeContext(job, staging, store, plugins, report, log)
        metrics = dict(node_type.run(context, job.inputs, params) or {})
    return metrics, context, peak.bytes


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(e, NodeError) else f"{type(e).__name__}: {message}"


def _node_logger(job: Job) -> logging.Logger:
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


def _worker(job: Job, extra_modules: tuple[str, ...], events: Any) -> None:
    """Entry point of a parallel worker process."""
    os.environ["GPTFLOW_PLUGINS"] = ",".join(extra_modules)
    plugins = load_plugins()
    execute(job, plugins, lambda event, payload: events.put((job.node, event, payload)))


class Runner:
    def __init__(self, pipeline: Pipeline, plugins: Plugins, store: Store, display: Display,
                 jobs: int = 1) -> None:
        self.pipeline, self.plugins, self.store = pipeline, plugins, store
        self.display, self.jobs = display, max(1, jobs)

    def run(self, steps: list[Step], argv: list[str] | None = None) -> dict[str, Any]:
        """Run the steps; returns the run record (also written to run.json)."""
        store, display = self.store, self.display
        run_id = store.new_run_id()
        record: dict[str, Any] = {
            "schema": RUN_SCHEMA, "run_id": run_id, "status": "running", "pid": os.getpid(),
            "command": argv or [], "started": now(), "ended": None,
            "pipeline": {"name": self.pipeline.name, "file": str(self.pipeline.path),
                         "sha256": self.pipeline.sha256,
                         "overrides": list(self.pipeline.overrides)},
            "nodes": {s.node.name: {"plugin": s.node.plugin, "status": "pending",
                                    "fingerprint": s.fingerprint, "reason": s.reason,
                                    "outputs": {}, "metrics": {}, "duration_s": None,
                                    "log": str(store.run_dir(run_id) / "logs" /
                                               f"{s.node.name}.log")}
                      for s in steps}}
        store.save_run(record)
        store.clean_tmp()
        self.record = record
        self.plugins.before_pipeline_run(run_id, self.pipeline.name, list(record["nodes"]))
        status = "ok"
        try:
            self._schedule(steps)
            if any(n["status"] in ("failed", "skipped") for n in record["nodes"].values()):
                status = "failed"
        except KeyboardInterrupt:
            status = "interrupted"
            for node in record["nodes"].values():
                if node["status"] in ("pending", "running"):
                    node["status"] = "interrupted"
        finally:
            record["status"], record["ended"] = status, now()
            store.save_run(record)
            self.plugins.after_pipeline_run(run_id, status, record)
        display.summary(record)
        return record

    # -- scheduling ----------------------------------------------------------------
    def _schedule(self, steps: list[Step]) -> None:
        nodes = self.record["nodes"]
        todo = {s.node.name: s for s in steps}
        by_name = dict(todo)
        running: dict[str, Any] = {}
        events: Any = queue.SimpleQueue() if self.jobs == 1 else _context().Queue()
        while todo or running:
            for name, step in list(todo.items()):
                ups = [nodes[u]["status"] for u in step.node.upstream()]
                if any(u in ("failed", "skipped", "interrupted") for u in ups):
                    del todo[name]
                    nodes[name]["status"] = "skipped"
                    self.display.finished(name, "skipped", "[dim]skipped: an upstream node failed")
                elif all(u in ("ran", "cached") for u in ups) and len(running) < self.jobs:
                    del todo[name]
                    running[name] = self._start(step, events)
            if not running:
                continue
            node, event, payload = events.get() if self.jobs == 1 else self._next(events, running)
            if self._handle(node, event, payload, by_name[node]):
                proc = running.pop(node)
                if proc is not None:
                    proc.join()
                if self.record["nodes"][node]["status"] != "cached":
                    self.store.save_run(self.record)

    def _start(self, step: Step, events: Any) -> Any:
        entry = self.record["nodes"][step.node.name]
        try:
            inputs = self._inputs(step)
            if step.action == "cached":
                self.store.outputs(step.fingerprint)  # verify before trusting it
        except CorruptArtifact as e:
            events.put((step.node.name, "failed",
                        f"corrupt artifact: {e}; re-run with --force {step.node.name}"))
            return None
        if step.action == "cached":
            events.put((step.node.name, "done", {
                "status": "cached",
                "metrics": self.store.node_record(step.fingerprint).get("metrics", {})}))
            return None
        entry["status"] = "running"
        self.display.started(step.node.name, step.node.plugin, step.reason)
        self.plugins.before_node_run(self.record["run_id"], step.node.name, step.node.plugin,
                                     step.fingerprint)
        job = make_job(self.record["run_id"], step, inputs, self.store, entry["log"])
        if self.jobs == 1:
            def report(event: str, payload: Any) -> None:
                self._progress(job.node, event, payload, events)

            execute(job, self.plugins, report)
            return None
        proc = _context().Process(target=_worker, args=(job, self.plugins.extra_modules, events),
                                  name=f"gptflow-{job.node}")
        proc.start()
        return proc

    def _progress(self, node: str, event: str, payload: Any, events: Any) -> None:
        """In-process events: progress goes straight to the display, the rest queues."""
        if event in ("progress", "waiting"):
            self._handle(node, event, payload, None)
        else:
            events.put((node, event, payload))

    def _next(self, events: Any, running: dict[str, Any]) -> tuple[str, str, Any]:
        while True:
            try:
                item: tuple[str, str, Any] = events.get(timeout=0.2)
                return item
            except queue.Empty:
                for name, proc in running.items():
                    if proc is not None and proc.exitcode is not None:
                        time.sleep(0.1)  # let a last message arrive
                        if events.empty():
                            return name, "failed", f"worker died (exit code {proc.exitcode})"

    def _handle(self, node: str, event: str, payload: Any, step: Step | None) -> bool:
        """Apply one event; True when the node is finished."""
        entry = self.record["nodes"][node]
        run_id = self.record["run_id"]
        if event == "progress":
            self.display.update(node, *payload)
            return False
        if event == "waiting":
            self.display.line(f"  {node}: waiting for another run that holds its lock")
            return False
        if event == "failed":
            entry["status"], entry["error"] = "failed", payload
            self.display.finished(node, "failed", f"FAILED: {payload} [dim](log: {entry['log']})")
            self.plugins.on_node_error(run_id, node, payload, entry["log"])
            return True
        assert step is not None
        entry["status"] = payload["status"]
        entry["metrics"] = payload["metrics"]
        entry["duration_s"] = payload.get("duration_s")
        entry["peak_mem_bytes"] = payload.get("peak_mem_bytes")
        entry["outputs"] = {name: str(self.store.artifact_dir(step.fingerprint) / name)
                            for name in step.node.node_type.outputs}
        detail = "cached" if payload["status"] == "cached" else \
            f"ran in {fmt_duration(payload['duration_s'])}"
        self.display.finished(node, payload["status"], detail)
        self.plugins.after_node_run(run_id, node, payload["status"], entry["metrics"],
                                    entry["outputs"])
        return True

    def _inputs(self, step: Step) -> dict[str, Any]:
        fps = {s: self.record["nodes"][s]["fingerprint"] for s in step.node.upstream()}
        return resolve_inputs(step, self.store, fps)


def make_job(run_id: str, step: Step, inputs: dict[str, Any], store: Store, log: str) -> Job:
    return Job(run_id, step.node.name, step.node.plugin, step.node.params.model_dump(mode="json"),
               step.fingerprint, step.manifest, inputs, dict(step.node.node_type.outputs),
               str(store.root), log, step.reason == "forced")


def resolve_inputs(step: Step, store: Store, fingerprints: dict[str, str]) -> dict[str, Any]:
    """Slot -> verified upstream artifact(s), as the node's run() receives them."""
    inputs: dict[str, Any] = {}
    for slot, spec in step.node.node_type.inputs.items():
        arts: list[Artifact] = [store.outputs(fingerprints[r.node])[r.output]
                                for r in step.node.inputs.get(slot, [])]
        inputs[slot] = arts if spec.many else (arts[0] if arts else None)
    return inputs


def follower_rank() -> int:
    """This process's rank when it is one of several processes of a distributed
    run (torchrun, SLURM, Lightning's launcher); 0 for the leader or a plain run."""
    for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def is_distributed(params: Any) -> bool:
    trainer = getattr(params, "trainer", None)
    devices = getattr(trainer, "devices", 1)
    return trainer is not None and (devices not in (1, "1") or trainer.num_nodes > 1)


def follow(steps: list[Step], plugins: Plugins, store: Store, rank: int,
           poll: float = 0.5) -> None:
    """The part of a non-zero rank: train the distributed nodes beside rank 0,
    write nothing to the store, and wait for rank 0 to publish each node."""
    fingerprints = {s.node.name: s.fingerprint for s in steps}
    for step in steps:
        if step.action == "cached":
            continue
        if is_distributed(step.node.params):
            staging = store.stage(step.fingerprint)
            log = store.root / "tmp" / f"follower-{step.fingerprint}.rank{rank}.log"
            job = make_job(f"rank{rank}", step, resolve_inputs(step, store, fingerprints), store,
                           str(log))
            for name in job.outputs:
                (staging / name).mkdir()
            try:
                run_node(job, plugins, store, staging, lambda event, payload: None,
                         _node_logger(job))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        while not store.has(step.fingerprint):
            time.sleep(poll)


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["gptflow.runner"])
    return ctx
