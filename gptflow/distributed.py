"""Several processes of one distributed run (Lightning's launcher, torchrun,
SLURM): rank 0 runs the pipeline as usual; every other rank trains the
distributed nodes beside it, writes nothing to the store, and waits for rank 0
to publish each node."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from gptflow.execute import Job, make_job, node_logger, resolve_inputs, run_node
from gptflow.manager import Plugins
from gptflow.plan import Step, resolve
from gptflow.store import Store


def follower_rank() -> int:
    """This process's rank when it is one of several processes of a distributed
    run (torchrun, SLURM, Lightning's launcher); 0 for the leader or a plain run."""
    for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def is_distributed(params: Any) -> bool:
    """Whether a node trains on several processes: its params' ``trainer`` says so."""
    trainer = getattr(params, "trainer", None)
    devices = getattr(trainer, "devices", 1)
    return trainer is not None and (devices not in (1, "1") or trainer.num_nodes > 1)


def follow(steps: list[Step], plugins: Plugins, store: Store, rank: int,
           poll: float = 0.5) -> None:
    """The part of a non-zero rank: train the distributed nodes beside rank 0,
    write nothing to the store, and wait for rank 0 to publish each node."""
    fingerprints = {s.node.name: s.fingerprint for s in steps}
    for step in steps:
        if step.pending:  # rank 0 published its inputs before this rank got here
            step = resolve(step, store, fingerprints)
            fingerprints[step.node.name] = step.fingerprint
        if step.action == "cached":
            continue
        if is_distributed(step.node.params):
            upstream = {u: fingerprints[u] for u in step.node.upstream()}
            train_beside(make_job(f"rank{rank}", step, upstream, plugins, store, {}), plugins,
                         store, rank)  # rank 0 alone tracks
        while not store.has(step.fingerprint):
            time.sleep(poll)


def train_beside(job: Job, plugins: Plugins, store: Store, rank: int) -> None:
    """A distributed node's part on a non-zero rank: trained into a private staging
    folder that is never published (rank 0 publishes)."""
    staging = store.stage(job.fingerprint, job.run_id)
    log = store.root / "tmp" / f"follower-{job.fingerprint}.rank{rank}.log"
    for name in job.outputs:
        (staging / name).mkdir()
    try:
        run_node(job, resolve_inputs(job, plugins, store), plugins, store, staging,
                 lambda event: None, log, node_logger(job, log))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
