"""Executors: how a run's nodes get computed. The runner plans, schedules and keeps
the record; an executor starts the jobs it is given and says how each ended.

Built-ins: ``local`` (in this process, or ``jobs`` worker processes sharing the
cores) and ``ray`` (each node a Ray task with its resources). Third parties add
more through the ``register_executors`` hook with a subclass of :class:`Executor`.

What an executor ships is data, never a closure: a :class:`~gptflow.execute.Job`,
written as the job spec ``runs/<run>/jobs/<node>.json``, and one command any
machine that mounts the store can run, ``gptflow exec-node RUN NODE --store DIR``.
It computes the node under its lock, publishes it, and streams its events as JSON
lines to ``runs/<run>/events/<node>.jsonl``. Whether a node succeeded is what the
store says (its artifact is published), never what the engine reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from gptflow import Params, hookimpl
from gptflow.dag import Pipeline
from gptflow.execute import Done, Failed, Job, Progress, Waiting, event_from_json
from gptflow.manager import Plugins
from gptflow.records import NodeStatus
from gptflow.store import Store, write_json

Outcome = Done | Failed
OnProgress = Callable[[str, Progress | Waiting], None]


class NoOptions(Params):
    pass


class Executor:
    """The seam between the runner and an engine. The runner calls, from its main
    thread: :meth:`submit` for each node whose inputs are published (while fewer
    than :attr:`slots` run), :meth:`next` to learn how one ended, :meth:`cancel` on
    Ctrl-C or SIGTERM, and :meth:`close` at the end. Progress goes to ``progress``,
    called from :meth:`submit` or :meth:`next`."""

    name: ClassVar[str]
    options: ClassVar[type[Params]] = NoOptions

    def __init__(self, options: Any, store: Store, plugins: Plugins,
                 progress: OnProgress) -> None:
        self.config, self.store, self.plugins, self.progress = options, store, plugins, progress

    @property
    def slots(self) -> int | None:
        """How many nodes may run at once (None: as many as the engine takes)."""
        return None

    @classmethod
    def problem(cls, options: Any, store: Store, pipeline: Pipeline) -> str | None:
        """Why this executor cannot run this pipeline on this store, in one line (or
        None): checked by ``gptflow validate``, before anything runs."""
        return None

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def next(self) -> tuple[str, Outcome]:
        """Block until a submitted node ends; its name and outcome."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop every running node as on SIGTERM (a training node saves a checkpoint)."""

    def close(self) -> None:
        """Release what the executor holds (connections, processes)."""


def job_spec(store: Store, run_id: str, node: str) -> Path:
    return store.run_dir(run_id) / "jobs" / f"{node}.json"


def event_stream(store: Store, run_id: str, node: str) -> Path:
    return store.run_dir(run_id) / "events" / f"{node}.jsonl"


def write_job(store: Store, job: Job) -> None:
    path = job_spec(store, job.run_id, job.node)
    path.parent.mkdir(parents=True, exist_ok=True)
    event_stream(store, job.run_id, job.node).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, job.to_json())


class EventReader:
    """Reads a node's event stream as it grows (complete lines only): the progress
    read since last time, and the last outcome the node reported."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.final: Outcome | None = None

    def read(self) -> list[Progress | Waiting]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        progress: list[Progress | Waiting] = []
        for line in complete.splitlines():
            event = event_from_json(json.loads(line))
            if isinstance(event, Progress | Waiting):
                progress.append(event)
            else:
                self.final = event
        return progress


def settle(store: Store, job: Job, final: Outcome | None, lost: str) -> Outcome:
    """How a node ended, as the store has it: done only if its artifact is published
    (a worker may die after publishing, or report success it never reached)."""
    if store.has(job.fingerprint):
        if isinstance(final, Done):
            return final
        return Done(NodeStatus.RAN, store.node_record(job.fingerprint).metrics)
    if isinstance(final, Failed):
        return final
    return Failed(f"{lost}; nothing was published (a training node resumes from its last "
                  "checkpoint when run again)")


@hookimpl
def register_executors(register: Callable[[Any], None]) -> None:
    from gptflow.executors.local import Local
    from gptflow.executors.raytasks import Ray

    register(Local)
    register(Ray)
