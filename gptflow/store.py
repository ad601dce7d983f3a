"""The content-addressed store: artifacts, locks, hash cache, run records.

Layout under the store root (``.gptflow/`` by default)::

    artifacts/<fingerprint>/node.json            what made it, its metrics
    artifacts/<fingerprint>/<output>/artifact.json + files
    work/<fingerprint>/                          checkpoints that survive a crash
    tmp/                                         staging folders, never trusted
    locks/<fingerprint>.lock                     one writer per fingerprint (a lease)
    runs/<run-id>/run.json, heartbeat, logs/<node>.log, loggers/<node>/ (trackers),
                  jobs/<node>.json, events/<node>.jsonl (nodes run by exec-node)

File hashes are cached outside the store, per host (:func:`cache_dir`).

A node writes into a staging folder; :meth:`Store.publish` writes the checksums
and makes it visible with one atomic rename, so a crash at any moment leaves
nothing half-written that a later run would trust.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gptflow.cachedir import cache_dir
from gptflow.errors import one_line
from gptflow.liveness import LEASE_S, Heartbeat, alive, current_owner, pid_alive
from gptflow.nodes import Artifact
from gptflow.records import NodeRecord, NodeStatus, Owner, RunRecord, RunStatus

FORMAT_VERSION = 1
CHUNK = 1 << 20
LOCK_POLL_S = 0.1


def default_root() -> Path:
    return Path(os.environ.get("GPTFLOW_STORE", ".gptflow"))


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class CorruptArtifact(Exception):
    """A published artifact whose files do not match their checksums."""


class CorruptRecord(ValueError):
    """A run.json or node.json that cannot be read or does not match its schema."""


def _read_record(path: Path, kind: type[RunRecord] | type[NodeRecord]) -> Any:
    try:
        return kind.model_validate_json(path.read_bytes())
    except OSError as e:
        raise CorruptRecord(f"{path}: unreadable ({e.strerror})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CorruptRecord(f"{path}: {where or 'record'}: {first['msg']}") from None


class Store:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = (Path(root) if root is not None else default_root()).absolute()
        self._db: sqlite3.Connection | None = None

    # -- paths ---------------------------------------------------------------
    def artifact_dir(self, fingerprint: str) -> Path:
        return self.root / "artifacts" / fingerprint

    def work_dir(self, fingerprint: str) -> Path:
        return self.root / "work" / fingerprint

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def node_log(self, run_id: str, node: str) -> Path:
        """A node's log file in a run (its output, tracebacks, an exec-node's own words)."""
        return self.run_dir(run_id) / "logs" / f"{node}.log"

    def logger_dir(self, run_id: str, node: str) -> Path:
        """Where a node's tracker files (TensorBoard, W&B offline) outlive it."""
        return self.run_dir(run_id) / "loggers" / node

    # -- content hashes, remembered by (path, size, mtime, ctime, inode) -----
    @property
    def hash_cache(self) -> Path:
        """The file-hash cache: per host and outside the store, so a store on a shared
        file system holds no SQLite database (whose locking such file systems break)."""
        return cache_dir() / f"hashes-{socket.gethostname()}.sqlite"

    def _hashes(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._open_hash_cache()
            weakref.finalize(self, self._db.close)  # closed with its store, never leaked
        return self._db

    def _open_hash_cache(self) -> sqlite3.Connection:
        path = self.hash_cache
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return _open_hashes(path)
        except sqlite3.DatabaseError:  # a cache: rebuilt, never a reason to fail
            for stale in (path, path.with_name(path.name + "-wal"),
                          path.with_name(path.name + "-shm")):
                stale.unlink(missing_ok=True)
            return _open_hashes(path)

    def hash_file(self, path: Path, full: bool = False) -> str:
        """sha256 of a file. An unchanged file (same size, mtime, ctime, inode) costs
        one stat unless ``full``; ctime catches a write whose mtime was restored."""
        key = str(path.resolve())
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        db = self._hashes()
        row = db.execute("SELECT size, mtime_ns, ctime_ns, ino, sha256 FROM files WHERE path=?",
                         (key,)).fetchone()
        if row and tuple(row[:4]) == stamp and not full:
            return str(row[4])
        digest = sha256_file(path)
        db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                   (key, *stamp, digest))
        return digest

    def hash_path(self, path: Path) -> str:
        """sha256 of a file, or of a folder's relative names and file hashes."""
        if path.is_file():
            return self.hash_file(path)
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{self.hash_file(f)}\n".encode())
        return h.hexdigest()

    # -- artifacts -------------------------------------------------------------
    def has(self, fingerprint: str) -> bool:
        return (self.artifact_dir(fingerprint) / "node.json").is_file()

    def node_record(self, fingerprint: str) -> NodeRecord:
        try:
            record: NodeRecord = _read_record(self.artifact_dir(fingerprint) / "node.json",
                                              NodeRecord)
        except CorruptRecord as e:
            raise CorruptArtifact(str(e)) from None
        return record

    def outputs(self, fingerprint: str, verify: bool = True,
                full: bool = False) -> dict[str, Artifact]:
        """The published outputs of a node, checked against their checksums
        (``full``: every byte re-hashed, whatever the stat cache says)."""
        record = self.node_record(fingerprint)
        found = {}
        for name in record.outputs:
            path = self.artifact_dir(fingerprint) / name
            found[name] = self.artifact(path, verify, full)
        return found

    def digest(self, fingerprint: str, output: str) -> str:
        """The content digest of a published output: its type and the sha256 of
        every file (what downstream fingerprints are made of)."""
        found, files = _read_artifact(self.artifact_dir(fingerprint) / output)
        content = {"type": found.type,
                   "files": {rel: {"sha256": sha, "size": size} for rel, (size, sha) in
                             files.items()}}
        return "sha256:" + hashlib.sha256(canonical_json(content).encode()).hexdigest()

    def artifact(self, path: Path, verify: bool = True, full: bool = False) -> Artifact:
        """The artifact in folder ``path``, checked against its artifact.json."""
        found, files = _read_artifact(path)
        if verify:
            for rel, (size, sha256) in files.items():
                f = path / rel
                if not f.is_file():
                    raise CorruptArtifact(f"{f}: missing")
                if f.stat().st_size != size:
                    raise CorruptArtifact(f"{f}: size {f.stat().st_size}, expected {size}")
                if self.hash_file(f, full) != sha256:
                    raise CorruptArtifact(f"{f}: sha256 mismatch")
            extra = sorted(rel for p in path.rglob("*") if not p.is_dir()
                           and (rel := p.relative_to(path).as_posix()) not in files
                           and rel != "artifact.json")
            if extra:
                raise CorruptArtifact(f"{path / extra[0]}: not part of the artifact")
        return found

    def stage(self, fingerprint: str, run_id: str) -> Path:
        """A fresh private folder to build a node's outputs in, owned by a run."""
        path = self.root / "tmp" / f"{fingerprint}.{run_id}.{secrets.token_hex(4)}"
        path.mkdir(parents=True)
        return path

    def publish(self, staging: Path, fingerprint: str, record: NodeRecord,
                outputs: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
        """Checksum every output, write node.json, then rename into place.

        ``outputs`` maps each output name to its (artifact type, meta).
        """
        for name, (kind, meta) in outputs.items():
            path = staging / name
            files = {}
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                files[f.relative_to(path).as_posix()] = {"sha256": sha256_file(f, sync=True),
                                                         "size": f.stat().st_size}
            write_json(path / "artifact.json", {
                "type": kind, "format_version": FORMAT_VERSION,
                "fingerprint": f"{fingerprint}/{name}",
                "producer": {"node": record.node, "plugin": record.plugin,
                             "plugin_version": record.version, "run_id": record.run_id},
                "files": files, "meta": dict(meta)})
        record.outputs = list(outputs)
        write_json(staging / "node.json", record.to_json())
        target = self.artifact_dir(fingerprint)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # --force over an old or corrupt copy
            trash = self.root / "tmp" / f"trash.{fingerprint}.{secrets.token_hex(4)}"
            os.rename(target, trash)
            os.rename(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)

    def clean(self) -> None:
        """Remove what crashes leave behind, never what a live run may still use:
        staging folders and half-written records of dead runs, and the work
        folders (checkpoints) of nodes published since."""
        for path in (self.root / "tmp").glob("*"):
            run_id = path.name.split(".", 1)[-1].rpartition(".")[0]
            if path.name.startswith("trash.") or (run_id and self._dead(run_id)):
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob("runs/*/.*.tmp"):
            if self._dead(path.parent.name):
                path.unlink(missing_ok=True)
        for path in self.root.glob("work/*"):
            if self.has(path.name):
                with self.lock(path.name, wait=False) as held:
                    if held:  # else a --force run is training there
                        shutil.rmtree(path, ignore_errors=True)

    def _dead(self, run_id: str) -> bool:
        if not (self.run_dir(run_id) / "run.json").exists():  # not yet, or never, written:
            try:  # its lease is taken before its record (see Runner.run)
                return time.time() - self.heartbeat(run_id).stat().st_mtime > LEASE_S
            except FileNotFoundError:
                return True
        try:
            return self.load_run(run_id).status != RunStatus.RUNNING
        except CorruptRecord:
            return False  # cannot tell: keep it

    @contextlib.contextmanager
    def lock(self, fingerprint: str, on_wait: Callable[[], None] | None = None,
             wait: bool = True) -> Iterator[bool]:
        """Hold the one-writer lock of a fingerprint; yields whether it is held (only
        ``wait=False`` gives up on a held lock). A lock file created atomically, naming
        its owner and kept fresh as a lease, so it works on a file system several
        machines share (where ``flock`` may not) and dies with its owner."""
        path = self.root / "locks" / f"{fingerprint}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = _lock_token()
        waited = False
        while not _take_lock(path, mine):
            if not wait:
                yield False
                return
            if on_wait and not waited:
                on_wait()
                waited = True
            time.sleep(LOCK_POLL_S)
        try:
            with Heartbeat(path):
                yield True
        finally:
            with contextlib.suppress(OSError):
                if path.read_text(encoding="utf-8") == mine:  # not broken and re-taken
                    path.unlink()

    # -- runs --------------------------------------------------------------------
    def new_run_id(self) -> str:
        """Sortable by start time (to the millisecond), unique by a random suffix."""
        t = dt.datetime.now()
        return f"{t:%Y%m%d-%H%M%S}.{t.microsecond // 1000:03d}-{secrets.token_hex(2)}"

    def run_ids(self) -> list[str]:
        runs = self.root / "runs"
        return sorted(p.name for p in runs.iterdir() if (p / "run.json").is_file()) \
            if runs.is_dir() else []

    def runs(self, ids: list[str] | None = None) -> tuple[list[RunRecord], list[str]]:
        """The readable run records (of ``ids``, default all), and one line for each
        that is not: a damaged record never stops the others being read."""
        records, problems = [], []
        for run_id in self.run_ids() if ids is None else ids:
            try:
                records.append(self.load_run(run_id))
            except CorruptRecord as e:
                problems.append(f"skipped {e}")
        return records, problems

    def resolve_run(self, run: str) -> str:
        ids = self.run_ids()
        if run == "latest":
            if not ids:
                raise KeyError(f"no runs in {self.root}")
            return ids[-1]
        matches = [i for i in ids if i == run] or [i for i in ids if i.startswith(run)]
        if len(matches) != 1:
            raise KeyError(f"no run {run!r} in {self.root}" if not matches
                           else f"run {run!r} is ambiguous: {', '.join(matches)}")
        return matches[0]

    def load_run(self, run_id: str) -> RunRecord:
        record: RunRecord = _read_record(self.run_dir(run_id) / "run.json", RunRecord)
        if record.status == RunStatus.RUNNING and not self._alive(record):
            record.status = RunStatus.KILLED
            for node in record.nodes.values():
                if node.status == NodeStatus.RUNNING:
                    node.status = NodeStatus.INTERRUPTED
        return record

    def _alive(self, record: RunRecord) -> bool:
        if record.owner is None:  # written before owners were recorded
            return pid_alive(record.pid)
        return alive(record.owner, self.heartbeat(record.run_id))

    def heartbeat(self, run_id: str) -> Path:
        """The lease a live run keeps fresh (see :mod:`gptflow.liveness`)."""
        return self.run_dir(run_id) / "heartbeat"

    def save_run(self, record: RunRecord) -> None:
        path = self.run_dir(record.run_id)
        (path / "logs").mkdir(parents=True, exist_ok=True)
        write_json(path / "run.json", record.to_json())


def sha256_file(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _read_artifact(path: Path) -> tuple[Artifact, dict[str, tuple[int, str]]]:
    """An artifact folder's artifact.json: the artifact, and each file's (size, sha256)."""
    try:
        info = json.loads((path / "artifact.json").read_text())
        found = Artifact(path=path, type=info["type"], fingerprint=info["fingerprint"],
                         producer=info["producer"]["node"], meta=info.get("meta", {}))
        files = {rel: (int(f["size"]), str(f["sha256"])) for rel, f in info["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptArtifact(f"{path}/artifact.json: unreadable ({one_line(e)})") from None
    return found, files


def _lock_token() -> str:
    return canonical_json({"owner": current_owner().to_json(), "token": secrets.token_hex(8)})


def _take_lock(path: Path, mine: str) -> bool:
    """Create the lock file, or break it if its owner is dead (seen so from this host,
    or its lease expired) and try again once."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _lock_dead(path):
                return False
            _break_lock(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mine)
        return True
    return False


def _lock_dead(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
        owner = Owner.model_validate(json.loads(text)["owner"])
    except FileNotFoundError:
        return False  # released meanwhile: simply try again
    except (OSError, ValueError, KeyError, TypeError):  # being written, or damaged
        try:
            return time.time() - path.stat().st_mtime > LEASE_S
        except FileNotFoundError:
            return False
    return not alive(owner, path)


def _break_lock(path: Path) -> None:
    """Set a dead owner's lock aside. If another process broke it and took the lock
    meanwhile, what was set aside is that live lock: it goes back."""
    try:
        seen = path.read_text(encoding="utf-8")
        aside = path.with_name(f"{path.name}.broken.{secrets.token_hex(4)}")
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if aside.read_text(encoding="utf-8") != seen:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


def _open_hashes(path: Path) -> sqlite3.Connection:
    # closed by a finalizer, which may run in any thread; used by its Store's alone
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a cache: speed over durability
        db.execute("DROP TABLE IF EXISTS hashes")  # before ctime was part of the key
        db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                   "mtime_ns INTEGER, ctime_ns INTEGER, ino INTEGER, sha256 TEXT)")
        db.execute("SELECT 1 FROM files LIMIT 1").fetchone()  # a damaged file fails here
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
