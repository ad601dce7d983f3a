"""The ``local`` executor: nodes in this process, or with ``jobs`` > 1 in worker
processes (forkserver) that share the cores, rebuild the plugin manager by module
name and send their events back over a queue."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections import deque
from typing import Any

from pydantic import Field

from gptflow import Params, signals
from gptflow.execute import Event, Failed, Job, Progress, Waiting, execute
from gptflow.executors import Executor, OnProgress, Outcome
from gptflow.liveness import current_owner, stop_when_gone
from gptflow.manager import Plugins, load_plugins
from gptflow.records import Owner
from gptflow.signals import Interrupted
from gptflow.store import Store

WORKER_GRACE_S = 60.0  # how long an interrupted worker may take to finish its step


class LocalOptions(Params):
    jobs: int = Field(1, ge=1)
    """Independent nodes at once, each in a worker process with its share of the
    cores (1: in the runner's own process). ``gptflow run --jobs K`` sets it."""


class Local(Executor):
    name = "local"
    options = LocalOptions

    def __init__(self, options: Any, store: Store, plugins: Plugins,
                 progress: OnProgress) -> None:
        super().__init__(options, store, plugins, progress)
        self.jobs: int = options.jobs
        self.done: deque[tuple[str, Outcome]] = deque()  # in-process outcomes
        self.procs: dict[str, Any] = {}
        self.events: Any = _context().Queue() if self.jobs > 1 else None

    @property
    def slots(self) -> int:
        return self.jobs

    def submit(self, job: Job) -> None:
        if self.jobs == 1:
            def report(event: Event) -> None:
                if isinstance(event, Progress | Waiting):
                    self.progress(job.node, event)
                else:
                    self.done.append((job.node, event))

            execute(job, self.plugins, self.store, report)
            return
        threads = max(1, len(os.sched_getaffinity(0)) // self.jobs)
        proc = _context().Process(target=_worker, name=f"gptflow-{job.node}",
                                  args=(job, str(self.store.root), self.events,
                                        current_owner(), threads))
        proc.start()
        self.procs[job.node] = proc

    def next(self) -> tuple[str, Outcome]:
        while not self.done:
            node, event = self._event()
            if isinstance(event, Progress | Waiting):
                self.progress(node, event)
                continue
            self.procs.pop(node).join()
            self.done.append((node, event))
        return self.done.popleft()

    def _event(self) -> tuple[str, Event]:
        while True:
            try:
                item: tuple[str, Event] = self.events.get(timeout=0.2)
                return item
            except queue.Empty:
                for name, proc in self.procs.items():
                    if proc.exitcode is not None:
                        time.sleep(0.1)  # let a last message arrive
                        if self.events.empty():
                            return name, Failed(f"worker died (exit code {proc.exitcode})")

    def cancel(self) -> None:
        """Ask every worker to stop as on SIGTERM, then make sure none is left."""
        procs = [p for p in self.procs.values() if p.is_alive()]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + WORKER_GRACE_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs.clear()


def _worker(job: Job, store_root: str, events: Any, runner: Owner, threads: int) -> None:
    """Entry point of a worker process. It gets its share of the cores (torch reads
    OMP_NUM_THREADS when first imported; a value set by the user wins), and stops, as
    on SIGTERM, when the runner that started it dies, so nothing is published after."""
    os.environ["GPTFLOW_PLUGINS"] = ",".join(job.plugins)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    stop_when_gone(runner)
    with signals.handled():
        plugins = load_plugins()
        try:
            execute(job, plugins, Store(store_root), lambda event: events.put((job.node, event)))
        except Interrupted as e:
            events.put((job.node, Failed(f"interrupted ({e.name})")))


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["gptflow.executors.local"])
    return ctx
