"""Run a planned pipeline: nodes in dependency order, the run record kept up
to date in ``run.json``, lifecycle hooks called, progress shown.

With ``jobs=1`` nodes execute in this process; with ``jobs>1`` independent
nodes execute in parallel worker processes (forkserver), which rebuild the
plugin manager by module name and send their events back over a queue.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from typing import Any

from gptflow import signals
from gptflow.console import Display, fmt_duration
from gptflow.dag import Pipeline
from gptflow.errors import one_line
from gptflow.execute import (
    Done,
    Event,
    Failed,
    Job,
    Progress,
    Waiting,
    execute,
    make_job,
    resolve_inputs,
)
from gptflow.liveness import Heartbeat, current_owner, seen_alive
from gptflow.manager import Plugins, load_plugins
from gptflow.plan import Step, resolve
from gptflow.records import NodeEntry, NodeStatus, Owner, PipelineInfo, RunRecord, RunStatus
from gptflow.signals import Interrupted
from gptflow.store import CorruptArtifact, Store, now

WORKER_GRACE_S = 60.0  # how long an interrupted worker may take to finish its step


def _worker(job: Job, extra_modules: tuple[str, ...], events: Any, runner: Owner,
            threads: int) -> None:
    """Entry point of a parallel worker process. It gets its share of the cores
    (torch reads OMP_NUM_THREADS when first imported; a value set by the user wins),
    and stops, as on SIGTERM, when the runner that started it dies, so nothing is
    published after it."""
    os.environ["GPTFLOW_PLUGINS"] = ",".join(extra_modules)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    def watch() -> None:
        while seen_alive(runner) is not False:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gptflow-watch-runner", daemon=True).start()
    with signals.handled():
        plugins = load_plugins()
        try:
            execute(job, plugins, lambda event: events.put((job.node, event)))
        except Interrupted as e:
            events.put((job.node, Failed(f"interrupted ({e.name})")))


class Runner:
    def __init__(self, pipeline: Pipeline, plugins: Plugins, store: Store, display: Display,
                 jobs: int = 1) -> None:
        self.pipeline, self.plugins, self.store = pipeline, plugins, store
        self.display, self.jobs = display, max(1, jobs)

    def run(self, steps: list[Step], argv: list[str] | None = None) -> RunRecord:
        """Run the steps; returns the run record (also written to run.json)."""
        store = self.store
        run_id = store.new_run_id()
        logs = store.run_dir(run_id) / "logs"
        self.record = record = RunRecord(
            run_id=run_id, pid=os.getpid(), owner=current_owner(), command=argv or [],
            started=now(),
            pipeline=PipelineInfo(name=self.pipeline.name, file=str(self.pipeline.path),
                                  sha256=self.pipeline.sha256,
                                  overrides=list(self.pipeline.overrides)),
            nodes={s.node.name: NodeEntry(plugin=s.node.plugin, fingerprint=s.fingerprint,
                                          reason=s.reason, log=str(logs / f"{s.node.name}.log"))
                   for s in steps})
        logs.mkdir(parents=True)
        with Heartbeat(store.heartbeat(run_id)):  # the lease first: see gptflow.liveness
            store.save_run(record)
            store.clean()
            self._run(steps)
        self.display.summary(record, self.plugins.headlines())
        for name, node in record.nodes.items():
            for note in node.warnings:
                self.display.line(f"[yellow]{name}: {note}[/]")
        for warning in record.warnings:
            self.display.line(f"[yellow]warning: {warning}[/]")
        return record

    def _run(self, steps: list[Step]) -> None:
        """Schedule the steps; the record says what happened, whatever escapes."""
        record, run_id = self.record, self.record.run_id
        self.plugins.hook_errors.clear()
        self.plugins.before_pipeline_run(run_id, self.pipeline.name, list(record.nodes),
                                         str(self.pipeline.path), self.pipeline.tracking)
        status = RunStatus.FAILED  # unless the schedule gets to its end
        try:
            with signals.handled():
                self._schedule(steps)
            if not any(n.status.blocks for n in record.nodes.values()):
                status = RunStatus.OK
        except Interrupted as e:
            status, record.signal = RunStatus.INTERRUPTED, e.name
            self._mark(NodeStatus.INTERRUPTED, NodeStatus.PENDING, NodeStatus.RUNNING)
        except BaseException as e:
            self._mark(NodeStatus.FAILED, NodeStatus.RUNNING, error=one_line(e))
            raise
        finally:
            record.status, record.ended = status, now()
            self.store.save_run(record)
            self.plugins.after_pipeline_run(run_id, status.value, record.to_json())
            if self.plugins.hook_errors:
                record.warnings = list(self.plugins.hook_errors)
                self.store.save_run(record)

    def _mark(self, status: NodeStatus, *was: NodeStatus, error: str | None = None) -> None:
        for node in self.record.nodes.values():
            if node.status in was:
                node.status, node.error = status, error or node.error

    # -- scheduling ----------------------------------------------------------------
    def _schedule(self, steps: list[Step]) -> None:
        nodes = self.record.nodes
        todo = {s.node.name: s for s in steps}
        self.steps = dict(todo)  # as resolved
        running: dict[str, Any] = {}
        events: Any = queue.SimpleQueue() if self.jobs == 1 else _context().Queue()
        try:
            while todo or running:
                for name, step in list(todo.items()):
                    ups = [nodes[u].status for u in step.node.upstream()]
                    if any(u.blocks for u in ups):
                        del todo[name]
                        nodes[name].status = NodeStatus.SKIPPED
                        self.display.finished(name, NodeStatus.SKIPPED,
                                             "[dim]skipped: an upstream node failed")
                    elif all(u.done for u in ups) and len(running) < self.jobs:
                        del todo[name]
                        running[name] = self._start(step, events)
                if not running:
                    continue
                node, event = events.get() if self.jobs == 1 else self._next(events, running)
                if self._handle(node, event, self.steps[node]):
                    proc = running.pop(node)
                    if proc is not None:
                        proc.join()
                    self.store.save_run(self.record)
        except Interrupted:
            _stop_workers(running)
            raise

    def _start(self, step: Step, events: Any) -> Any:
        entry = self.record.nodes[step.node.name]
        upstream = {u: self.record.nodes[u].fingerprint for u in step.node.upstream()}
        if step.pending:  # its inputs exist now: its real fingerprint, maybe cached
            step = resolve(step, self.store, upstream)
            self.steps[step.node.name] = step
            entry.fingerprint, entry.reason = step.fingerprint, step.reason
        try:
            inputs = resolve_inputs(step, self.store, upstream)
            if step.action == "cached":
                self.store.outputs(step.fingerprint)  # verify before trusting it
        except CorruptArtifact as e:
            events.put((step.node.name, Failed.corrupt(e, step.node.name)))
            return None
        if step.action == "cached":
            metrics = self.store.node_record(step.fingerprint).metrics
            events.put((step.node.name, Done(NodeStatus.CACHED, metrics)))
            return None
        entry.status = NodeStatus.RUNNING
        self.store.save_run(self.record)  # a kill from now on shows the node interrupted
        self.display.started(step.node.name, step.node.plugin, step.reason)
        self.plugins.before_node_run(self.record.run_id, step.node.name, step.node.plugin,
                                     step.fingerprint)
        job = make_job(self.record.run_id, step, inputs, self.store, entry.log,
                       self.store.logger_dir(self.record.run_id, step.node.name),
                       self.pipeline.tracking)
        if self.jobs == 1:
            def report(event: Event) -> None:
                """Progress goes straight to the display; the outcome queues."""
                if isinstance(event, Progress | Waiting):
                    self._handle(job.node, event, step)
                else:
                    events.put((job.node, event))

            execute(job, self.plugins, report)
            return None
        threads = max(1, len(os.sched_getaffinity(0)) // self.jobs)
        proc = _context().Process(target=_worker, args=(job, self.plugins.extra_modules, events,
                                                        self.record.owner, threads),
                                  name=f"gptflow-{job.node}")
        proc.start()
        return proc

    def _next(self, events: Any, running: dict[str, Any]) -> tuple[str, Event]:
        while True:
            try:
                item: tuple[str, Event] = events.get(timeout=0.2)
                return item
            except queue.Empty:
                for name, proc in running.items():
                    if proc is not None and proc.exitcode is not None:
                        time.sleep(0.1)  # let a last message arrive
                        if events.empty():
                            return name, Failed(f"worker died (exit code {proc.exitcode})")

    def _handle(self, node: str, event: Event, step: Step) -> bool:
        """Apply one event; True when the node is finished."""
        entry = self.record.nodes[node]
        run_id = self.record.run_id
        if isinstance(event, Progress):
            self.display.update(node, event.completed, event.total, event.text)
            return False
        if isinstance(event, Waiting):
            self.display.line(f"  {node}: waiting for another run that holds its lock")
            return False
        if isinstance(event, Failed):
            entry.status, entry.error = NodeStatus.FAILED, event.error
            self.display.finished(node, NodeStatus.FAILED,
                                  f"FAILED: {event.error} [dim](log: {entry.log})")
            self.plugins.on_node_error(run_id, node, event.error, entry.log)
            return True
        entry.status, entry.metrics = event.status, event.metrics
        entry.warnings = list(event.warnings)
        entry.duration_s, entry.peak_mem_bytes = event.duration_s, event.peak_mem_bytes
        entry.outputs = {name: str(self.store.artifact_dir(step.fingerprint) / name)
                         for name in step.node.node_type.outputs}
        cached = event.status == NodeStatus.CACHED
        detail = "cached" if cached else f"ran in {fmt_duration(event.duration_s or 0.0)}"
        self.display.finished(node, event.status, detail)
        self.plugins.after_node_run(run_id, node, event.status.value, entry.metrics,
                                    entry.outputs,
                                    self.store.node_record(step.fingerprint).to_json())
        return True


def _stop_workers(running: dict[str, Any]) -> None:
    """Ask every worker to stop as on SIGTERM (a training node finishes its step
    and saves a checkpoint), then make sure none is left."""
    procs = [p for p in running.values() if p is not None and p.is_alive()]
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + WORKER_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["gptflow.runner"])
    return ctx
