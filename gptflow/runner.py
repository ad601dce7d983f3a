"""Run a planned pipeline: nodes in dependency order, handed to an executor (see
:mod:`gptflow.executors`) as their inputs are published, the run record kept up to
date in ``run.json``, lifecycle hooks called, progress shown."""

from __future__ import annotations

import os

from gptflow import signals
from gptflow.console import Display, fmt_duration
from gptflow.dag import Pipeline
from gptflow.errors import one_line
from gptflow.execute import Done, Failed, Progress, Waiting, make_job
from gptflow.executors import Executor, Outcome
from gptflow.liveness import Heartbeat, current_owner
from gptflow.manager import Plugins
from gptflow.plan import Step, resolve
from gptflow.records import NodeEntry, NodeStatus, PipelineInfo, RunRecord, RunStatus
from gptflow.signals import Interrupted
from gptflow.store import CorruptArtifact, Store, now


class Runner:
    def __init__(self, pipeline: Pipeline, plugins: Plugins, store: Store, display: Display,
                 jobs: int | None = None) -> None:
        """``jobs``: the local executor's worker processes, as ``--jobs K`` sets them."""
        self.pipeline, self.plugins, self.store, self.display = pipeline, plugins, store, display
        name, options = pipeline.executor
        if jobs is not None and name == "local":
            options = {**options, "jobs": jobs}
        self.executor_choice = name, options
        self._executor: Executor | None = None  # started when a node must run, not before

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            name, options = self.executor_choice
            registered = self.plugins.executors[name]
            self._executor = registered.factory(registered.options.model_validate(options),
                                                self.store, self.plugins, self._progress)
        return self._executor

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
                                          reason=s.reason,
                                          log=str(store.node_log(run_id, s.node.name)))
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
        running: set[str] = set()
        finished: list[tuple[str, Outcome]] = []  # decided without the executor
        try:
            while todo or running or finished:
                for name, step in list(todo.items()):
                    ups = [nodes[u].status for u in step.node.upstream()]
                    if any(u.blocks for u in ups):
                        del todo[name]
                        nodes[name].status = NodeStatus.SKIPPED
                        self.display.finished(name, NodeStatus.SKIPPED,
                                             "[dim]skipped: an upstream node failed")
                    elif all(u.done for u in ups) and self._room(len(running)):
                        del todo[name]
                        outcome = self._start(step)
                        if outcome is None:
                            running.add(name)
                        else:
                            finished.append((name, outcome))
                if finished:
                    node, outcome = finished.pop(0)
                elif running:
                    node, outcome = self.executor.next()
                    running.discard(node)
                else:
                    continue
                self._handle(node, outcome, self.steps[node])
                self.store.save_run(self.record)
        except Interrupted:
            if self._executor is not None:
                self._executor.cancel()
            raise
        finally:
            if self._executor is not None:
                self._executor.close()

    def _room(self, running: int) -> bool:
        slots = None if self._executor is None else self._executor.slots
        return slots is None or running < slots

    def _start(self, step: Step) -> Outcome | None:
        """Hand a step to the executor; its outcome when there is nothing to run."""
        entry = self.record.nodes[step.node.name]
        upstream = {u: self.record.nodes[u].fingerprint for u in step.node.upstream()}
        try:
            if step.pending:  # its inputs exist now: its real fingerprint, maybe cached
                step = resolve(step, self.store, upstream)
                self.steps[step.node.name] = step
                entry.fingerprint, entry.reason = step.fingerprint, step.reason
            if step.action == "cached":  # verified before it is trusted
                self.store.outputs(step.fingerprint)
                return Done(NodeStatus.CACHED, self.store.node_record(step.fingerprint).metrics)
        except CorruptArtifact as e:
            return Failed.corrupt(e, step.node.name)
        entry.status = NodeStatus.RUNNING
        self.store.save_run(self.record)  # a kill from now on shows the node interrupted
        self.display.started(step.node.name, step.node.plugin, step.reason)
        self.plugins.before_node_run(self.record.run_id, step.node.name, step.node.plugin,
                                     step.fingerprint)
        self.executor.submit(make_job(self.record.run_id, step, upstream, self.plugins,
                                      self.store, self.pipeline.tracking))
        return None

    def _progress(self, node: str, event: Progress | Waiting) -> None:
        if isinstance(event, Progress):
            self.display.update(node, event.completed, event.total, event.text)
        else:
            self.display.line(f"  {node}: waiting for another run that holds its lock")

    def _handle(self, node: str, event: Outcome, step: Step) -> None:
        """Record how a node ended."""
        entry = self.record.nodes[node]
        run_id = self.record.run_id
        if isinstance(event, Failed):
            entry.status, entry.error = NodeStatus.FAILED, event.error
            self.display.finished(node, NodeStatus.FAILED,
                                  f"FAILED: {event.error} [dim](log: {entry.log})")
            self.plugins.on_node_error(run_id, node, event.error, entry.log)
            return
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

