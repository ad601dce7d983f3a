"""The ``ray`` executor: each node a Ray task with the node's resources, which runs
``gptflow exec-node`` on whichever machine of the cluster Ray picks.

A training node with ``devices: N`` is one task holding N devices' worth of
resources, inside which Lightning's own launcher starts the N ranks (it re-runs
the exec-node command, the ranks find each other on that machine). Ray tasks are
retried only when ``retries`` says so; a retried node resumes from its checkpoint.
Ctrl-C on the driver cancels the tasks: each exec-node gets SIGTERM, finishes its
step and saves a checkpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlparse

from pydantic import Field

from gptflow import Params, signals
from gptflow.dag import Pipeline
from gptflow.execute import Job
from gptflow.executors import (
    EventReader,
    Executor,
    OnProgress,
    Outcome,
    event_stream,
    settle,
    write_job,
)
from gptflow.manager import Plugins
from gptflow.store import Store

CANCEL_GRACE_S = 60.0  # how long a cancelled node may take to checkpoint
POLL_S = 0.2
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# file systems that several machines mount (NFS, SMB, cluster file systems, FUSE mounts)
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
             "glusterfs", "9p", "virtiofs", "afs", "panfs", "wekafs", "fuse")


class RayOptions(Params):
    address: str | None = None
    """The cluster: ``auto`` (the one this machine belongs to), ``HOST:PORT`` or
    ``ray://HOST:10001``; default: ``$RAY_ADDRESS``, else a running local Ray, else a
    local Ray started for this run."""
    retries: int = Field(0, ge=0)
    """How often a node whose worker was lost is run again (it resumes from its
    checkpoint); a node that fails by itself is not retried."""
    store: str | None = None
    """The store's path on the workers, where their mount point differs from here."""
    shared_store: bool | None = None
    """Whether every machine of the cluster sees the store; default: judged by its
    file system (NFS, SMB, Lustre, GPFS, CephFS, FUSE mounts count as shared)."""
    connect_timeout_s: float = Field(10.0, gt=0, le=3600)
    """Seconds to wait for a cluster at HOST:PORT to answer before the run fails
    (Ray's own client waits minutes, silently)."""
    num_cpus: int | None = Field(None, ge=1)
    """Without an address: start a Ray of this run's own with this many CPUs (default:
    a running local Ray, else one started with every CPU)."""


class Ray(Executor):
    name = "ray"
    options = RayOptions

    def __init__(self, options: Any, store: Store, plugins: Plugins,
                 progress: OnProgress) -> None:
        super().__init__(options, store, plugins, progress)
        import ray

        self.ray = ray
        self.connected = not ray.is_initialized()  # by this executor, which disconnects
        problem = self.connected and unreachable(options.address, options.connect_timeout_s)
        if problem:
            raise ConnectionError(problem)
        if self.connected:  # num_cpus: a Ray of its own, whatever else runs here
            own = {"address": "local", "num_cpus": options.num_cpus} \
                if options.num_cpus and options.address is None else {"address": options.address}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **own)
        self.task = ray.remote(exec_node_task)
        self.running: dict[Any, tuple[Job, EventReader]] = {}  # task ref -> job, its events
        self.env = {k: v for k, v in os.environ.items() if k.startswith("GPTFLOW_")
                    and k != "GPTFLOW_STORE"}

    @classmethod
    def problem(cls, options: Any, store: Store, pipeline: Pipeline) -> str | None:
        for node in pipeline.nodes.values():
            nodes = getattr(getattr(node.params, "trainer", None), "num_nodes", 1)
            if nodes > 1:
                return (f"node {node.name!r} trains across {nodes} machines (trainer.num_nodes),"
                        " which one Ray task cannot; start it under torchrun or SLURM "
                        "(README: Scaling out)")
        if not _is_remote(options.address) or options.store:
            return None
        shared = options.shared_store
        if shared is None:
            shared = file_system(store.root).split(".")[0] in SHARED_FS
        if shared:
            return None
        return (f"the store {store.root} is on a {file_system(store.root) or 'local'} file "
                f"system that only this machine sees, and nodes run on the machines of the "
                f"cluster at {options.address}; put the store on a shared file system "
                "(--store /shared/path), or set shared_store: true if every machine mounts it")

    def submit(self, job: Job) -> None:
        write_job(self.store, job)
        resources = job.resources
        task = self.task.options(
            name=f"gptflow:{job.node}", num_cpus=resources["cpus"], num_gpus=resources["gpus"],
            memory=resources.get("memory"), max_retries=self.config.retries,
            retry_exceptions=False, runtime_env={"env_vars": self.env} if self.env else None)
        ref = task.remote(self.config.store or str(self.store.root), job.run_id, job.node)
        self.running[ref] = (job, EventReader(event_stream(self.store, job.run_id, job.node)))

    def next(self) -> tuple[str, Outcome]:
        with signals.deferred():  # a signal is taken between polls, never inside Ray's C++
            while True:
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=POLL_S)
                if signals.pending():
                    signals.stop()
                for job, events in self.running.values():
                    for event in events.read():
                        self.progress(job.node, event)
                if ready:
                    return self._outcome(ready[0])

    def _outcome(self, ref: Any) -> tuple[str, Outcome]:
        job, events = self.running.pop(ref)
        try:
            code = self.ray.get(ref)
            lost = f"exec-node exited with code {code}"
        except self.ray.exceptions.RayError as e:  # worker or node lost, task cancelled
            lost = f"lost its Ray worker ({type(e).__name__})"
        events.read()
        return job.node, settle(self.store, job, events.final, lost)

    def cancel(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: its exec-node gets SIGTERM
        self.ray.wait(list(self.running), num_returns=len(self.running),
                      timeout=CANCEL_GRACE_S)
        self.running.clear()

    def close(self) -> None:
        if self.connected:
            self.ray.shutdown()


def exec_node_task(store: str, run_id: str, node: str) -> int:
    """The Ray task: ``gptflow exec-node`` in a process of its own, its output appended
    to the node's log; cancelled, it passes SIGTERM on and waits for the checkpoint."""
    log = Store(store).node_log(run_id, node)
    command = [sys.executable, "-m", "gptflow.cli", "exec-node", run_id, node, "--store", store]
    with open(log, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        deadline = time.monotonic() + CANCEL_GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if proc.poll() is None:
            proc.kill()
        raise


def _is_remote(address: str | None) -> bool:
    """Whether nodes may run on other machines: any cluster but a local one."""
    if address is None:
        return False
    host = urlparse(address if "://" in address else f"ray://{address}").hostname
    return address == "auto" or host not in LOCAL_HOSTS


def unreachable(address: str | None, timeout: float) -> str | None:
    """Why the cluster at ``HOST:PORT`` (or ``ray://HOST:PORT``) does not accept a
    connection within ``timeout`` seconds, or None (it does, or the address names no
    host: ``auto``, a local Ray)."""
    if address in (None, "auto", "local"):
        return None
    url = urlparse(address if "://" in address else f"ray://{address}")
    port = url.port or (10001 if "://" in address else 6379)
    try:
        socket.create_connection((url.hostname or "", port), timeout).close()
    except OSError as e:
        return (f"the Ray cluster at {address} did not answer within {timeout:g} s "
                f"({e.strerror or type(e).__name__}); is it running? (executor option "
                "connect_timeout_s)")
    return None


def file_system(path: Any) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts; '' if unknown)."""
    best, kind = "", ""
    target = os.path.realpath(path)
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                mount = fields[1].replace("\\040", " ")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind
