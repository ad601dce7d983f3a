"""The worker's side of every executor but the in-process one: ``gptflow exec-node
RUN NODE --store DIR`` computes one node from its job spec, on any machine that
mounts the store and has the driver's code."""

from __future__ import annotations

import json
import os
import socket
import sys

from gptflow import signals
from gptflow.distributed import follower_rank, train_beside
from gptflow.errors import EXIT_FAILED, EXIT_INPUT, EXIT_OK, one_line
from gptflow.execute import (
    Done,
    Event,
    Failed,
    Job,
    event_json,
    execute,
)
from gptflow.executors import event_stream, job_spec
from gptflow.liveness import current_owner, stop_when_gone
from gptflow.manager import Plugins, load_plugins
from gptflow.signals import Interrupted
from gptflow.store import Store


def exec_node(store: Store, run_id: str, node: str) -> int:
    """Compute a node as its job spec says, its events streamed to the store; the
    exit code says how it ended (0 done, 1 failed, 2 refused)."""
    spec = job_spec(store, run_id, node)
    try:
        job = Job.from_json(json.loads(spec.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {spec}: no readable job spec ({one_line(e)})", file=sys.stderr)
        return EXIT_INPUT
    here = [m for m in os.environ.get("GPTFLOW_PLUGINS", "").split(",") if m.strip()]
    os.environ["GPTFLOW_PLUGINS"] = ",".join(dict.fromkeys([*here, *job.plugins]))
    plugins = load_plugins()
    rank = follower_rank()
    if rank:  # a rank that Lightning's launcher started beside this node's rank 0
        train_beside(job, plugins, store, rank)
        return EXIT_OK
    last: list[Event] = []
    with open(event_stream(store, run_id, node), "a", encoding="utf-8") as stream:
        def report(event: Event) -> None:
            stream.write(json.dumps(event_json(event)) + "\n")
            stream.flush()
            last[:] = [event]

        problem = refusal(job, plugins)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            report(Failed(problem))
            return EXIT_INPUT
        stop_when_gone(current_owner(os.getppid()))  # the engine's worker that started it
        with signals.handled():
            try:
                execute(job, plugins, store, report)
            except Interrupted as e:
                report(Failed(f"interrupted ({e.name})"))
                return e.exit_code
    return EXIT_OK if last and isinstance(last[0], Done) else EXIT_FAILED


def refusal(job: Job, plugins: Plugins) -> str | None:
    """Why this worker must not compute the job: a content-addressed cache is only
    ever filled by the code the driver planned with."""
    host = socket.gethostname()
    if job.plugin not in plugins.node_types:
        return (f"node type {job.plugin!r} ({job.versions.get('provider')}) is not installed "
                f"on worker {host}; install the driver's plugins there")
    here = plugins.versions(job.plugin)
    diffs = [f"{key} {here.get(key) or '-'} on {host}, {want or '-'} on the driver"
             for key, want in job.versions.items() if here.get(key) != want]
    if diffs:
        return ("refused: this worker's code differs from the driver's (" + "; ".join(diffs)
                + "); install the same versions everywhere")
    return None
