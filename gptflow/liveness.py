"""Is the process that owns a run still alive? Across hosts, containers and PID
namespaces sharing one store, a pid alone cannot say.

A run records its :class:`~gptflow.records.Owner`: host, boot id, PID namespace,
pid and the process's start time. Seen from the same host, boot and namespace,
the pid and its start time decide (a reused pid has another start time). Seen
from anywhere else they cannot, so the run's lease decides: the runner touches
``runs/<id>/heartbeat`` every :data:`BEAT_S` seconds, and a run whose lease is
older than :data:`LEASE_S` is dead. Nothing that may be alive is ever judged dead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
import time
from functools import cache
from pathlib import Path

from gptflow.records import Owner

BEAT_S = 10.0
LEASE_S = 120.0


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot); None if unknown, gone or a
    zombie (dead, only not yet reaped by its parent)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the name, which may hold spaces
    return None if fields[0] == "Z" else int(fields[19])  # fields 3 and 22 of proc(5)


@cache
def _here() -> tuple[str, str, str]:
    return socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), _pid_namespace()


def current_owner(pid: int | None = None) -> Owner:
    pid = os.getpid() if pid is None else pid
    host, boot, namespace = _here()
    return Owner(host=host, boot_id=boot, pid_ns=namespace, pid=pid, start=start_ticks(pid))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def seen_alive(owner: Owner) -> bool | None:
    """True or False when this process can tell, None when it cannot (another host,
    boot or PID namespace)."""
    if (owner.host, owner.boot_id, owner.pid_ns) != _here() or not owner.boot_id:
        return None
    if owner.start is None:  # no /proc where it ran
        return pid_alive(owner.pid)
    return owner.start == start_ticks(owner.pid)


def alive(owner: Owner, heartbeat: Path) -> bool:
    """Whether the owner may still be alive: its process seen from here, else its lease."""
    seen = seen_alive(owner)
    if seen is not None:
        return seen
    try:
        return time.time() - heartbeat.stat().st_mtime < LEASE_S
    except FileNotFoundError:
        return False  # the lease is taken before the record is first written


class Heartbeat:
    """Keeps a lease fresh from a daemon thread while a run lives."""

    def __init__(self, path: Path) -> None:
        self.path, self._stop = path, threading.Event()
        self._thread = threading.Thread(target=self._beat, name="gptflow-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(OSError):  # a full disk must not kill the run; a
                os.utime(self.path)  # lease someone broke is not made again


def stop_when_gone(owner: Owner) -> None:
    """Stop this process, as on SIGTERM (a training node saves a checkpoint), when
    ``owner`` (the process that started it) dies: nothing is published after."""
    def watch() -> None:
        while seen_alive(owner) is not False:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gptflow-watch-owner", daemon=True).start()
