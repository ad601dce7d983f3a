"""Public data by name: ``ni:TASK[@COMMIT][?n=N]`` (a Super-NaturalInstructions
task file) and ``data:NAME`` (a text from :data:`TEXTS`, e.g. ``data:tinyshakespeare``).

A named source becomes one file in the user's cache, ``<cache>/data/<sha256>/<name>``,
found in this order:

1. a local folder, ``$GPTFLOW_DATA`` (folders separated by ``os.pathsep``), laid out
   as upstream names it: ``natural-instructions*/TASK.json``, ``tinyshakespeare/input.txt``;
2. the cache, from an earlier download;
3. its upstream location over HTTPS (``$GPTFLOW_DATA_URL`` replaces the host, for a
   mirror), unless ``$GPTFLOW_OFFLINE=1``. A download is bounded in size and checked
   (a pinned sha256, or the task file's schema) before it is kept.

A task file is kept in one canonical form (the first N instances, keys gptflow's own
``_``-prefixed notes dropped, JSON written one way), so the same task has the same
bytes, and a node naming it the same fingerprint, wherever it came from. Pure
Python: no torch, no third-party package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from gptflow.cachedir import cache_dir

NI, DATA = "ni:", "data:"
UPSTREAM = "https://raw.githubusercontent.com"
NI_COMMIT = "ae457ac40dafe0cd3dcd1370f0a29da54f33df4a"
"""The commit of allenai/natural-instructions a task without ``@COMMIT`` is read at."""
NI_TASK = re.compile(r"task\d+_[A-Za-z0-9_.-]+")
REVISION = re.compile(r"[A-Za-z0-9_.-]+")
MAX_BYTES = 256 << 20  # the largest upstream task file is far smaller: a bound, not a guess
TIMEOUT_S = 30
_FAILED: dict[str, str] = {}  # url -> why, for this process


@dataclass(frozen=True)
class Text:
    """A public text file with a pinned checksum."""

    path: str  # under the upstream host
    local: str  # where a folder of $GPTFLOW_DATA holds it
    sha256: str


TEXTS: dict[str, Text] = {
    "tinyshakespeare": Text(
        "karpathy/char-rnn/master/data/tinyshakespeare/input.txt", "tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),  # 1.1 MB
}


class FetchError(LookupError):
    """A named source that could not be had: one line that says what and how to get it."""


def is_named(value: str) -> bool:
    return value.startswith((NI, DATA))


@dataclass(frozen=True)
class Task:
    """``ni:TASK@COMMIT?n=N``, parsed."""

    name: str
    commit: str
    n: int | None

    @classmethod
    def parse(cls, value: str) -> Task:
        ref, _, query = value.removeprefix(NI).partition("?")
        name, _, commit = ref.partition("@")
        if not NI_TASK.fullmatch(name):
            raise FetchError(f"{value!r}: a task is ni:taskNNN_name (a file name in "
                             "allenai/natural-instructions' tasks/, without .json)")
        if commit and not REVISION.fullmatch(commit):
            raise FetchError(f"{value!r}: @{commit} is not a commit, branch or tag")
        options = dict(parse_qsl(query, keep_blank_values=True))
        if set(options) - {"n"}:
            raise FetchError(f"{value!r}: ni: takes one option, ?n=N (the first N instances)")
        n = options.get("n")
        if n is not None and not (n.isdigit() and int(n) > 0):
            raise FetchError(f"{value!r}: ?n= takes a positive whole number")
        return cls(name, commit or NI_COMMIT, int(n) if n else None)

    @property
    def url_path(self) -> str:
        return f"allenai/natural-instructions/{self.commit}/tasks/{self.name}.json"


def fetch(value: str) -> Path:
    """The cached file a named source stands for, fetched if need be.

    Raises FetchError, one line naming the source and how to provide it by hand.
    """
    if value.startswith(NI):
        return _task(Task.parse(value), value)
    name = value.removeprefix(DATA)
    text = TEXTS.get(name)
    if text is None:
        raise FetchError(f"unknown data source {value!r}; known: "
                         f"{', '.join(DATA + n for n in TEXTS)}")
    for folder in _local_folders():
        if (folder / text.local).is_file():
            return _keep((folder / text.local).read_bytes(), Path(text.local).name, value,
                         text.sha256, f"{folder / text.local}")
    cached = _blob(text.sha256, Path(text.local).name)
    if cached.is_file():
        return cached
    return _keep(_download(text.path, value, text.local), Path(text.local).name, value,
                 text.sha256, _url(text.path))


def digest(value: str) -> str:
    """The sha256 of what a named source stands for: its fingerprint."""
    return fetch(value).parent.name


def _task(task: Task, value: str) -> Path:
    ref = cache_dir() / "data" / "refs" / f"{task.name}@{task.commit}"
    name = f"{task.name}.json"
    local = _local_task(task)
    known = ref.read_text().strip() if local is None and ref.is_file() else ""
    cached = _blob(known, name) if re.fullmatch(r"[0-9a-f]{64}", known) else None
    if local is not None:
        raw, where = local.read_bytes(), str(local)
    elif cached is not None and cached.is_file():
        raw, where = cached.read_bytes(), str(cached)
    else:
        raw, where = _download(task.url_path, value, f"natural-instructions/{name}"), \
            _url(task.url_path)
    data = _parse_task(raw, value, where)
    if where == _url(task.url_path):  # kept as fetched, so that later runs need no network
        _atomic_write(ref, _keep(raw, name, value, None, where).parent.name.encode())
    instances = data["Instances"]
    if task.n is not None:
        if len(instances) < task.n:
            raise FetchError(f"{value}: {where} holds {len(instances)} instances, fewer than "
                             f"?n={task.n}")
        instances = instances[:task.n]
    canonical = {k: (instances if k == "Instances" else v) for k, v in data.items()
                 if not k.startswith("_")}
    text = json.dumps(canonical, indent=4, ensure_ascii=False) + "\n"
    return _keep(text.encode(), f"{task.name}.json", value, None, where)


def _local_task(task: Task) -> Path | None:
    """The task's file in $GPTFLOW_DATA: the one with the most instances, or the first
    (in name order) with at least ``n``."""
    found = [p for folder in _local_folders()
             for p in sorted(folder.glob(f"natural-instructions*/{task.name}.json"))]
    if len(found) < 2:  # nothing to choose between: no file parsed to count
        return found[0] if found else None
    counts = {p: _instance_count(p) for p in found}
    enough = [p for p in found if task.n is not None and counts[p] >= task.n]
    return enough[0] if enough else max(found, key=counts.__getitem__)


def _instance_count(path: Path) -> int:
    try:
        instances = json.loads(path.read_text(encoding="utf-8")).get("Instances")
    except (OSError, ValueError, AttributeError):
        return 0
    return len(instances) if isinstance(instances, list) else 0


def _parse_task(raw: bytes, value: str, where: str) -> dict[str, Any]:
    """The task file's JSON, checked for the two keys every task has."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FetchError(f"{value}: {where} is not a JSON task file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list) \
            or not isinstance(data.get("Definition"), list):
        raise FetchError(f"{value}: {where} is not a Natural Instructions task file "
                         "(no Definition and Instances lists)")
    return data


def _local_folders() -> Iterator[Path]:
    for folder in os.environ.get("GPTFLOW_DATA", "").split(os.pathsep):
        if folder:
            yield Path(folder).expanduser()


def _url(path: str) -> str:
    return f"{os.environ.get('GPTFLOW_DATA_URL') or UPSTREAM}/{path}"


def _download(path: str, value: str, local: str) -> bytes:
    """The bytes at the upstream ``path``, at most MAX_BYTES of them."""
    hint = f"; or put the file at $GPTFLOW_DATA/{local}"
    if os.environ.get("GPTFLOW_OFFLINE", "0") not in ("", "0"):
        raise FetchError(f"{value}: not in $GPTFLOW_DATA nor the cache, and GPTFLOW_OFFLINE "
                         f"is set: fetch it once online{hint}")
    url = _url(path)
    if url in _FAILED:  # a pipeline names a source in several places: one wait, not one each
        raise FetchError(f"{value}: download from {url} failed ({_FAILED[url]}){hint}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            raw: bytes = response.read(MAX_BYTES + 1)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        _FAILED[url] = str(getattr(e, "reason", None) or e)
        raise FetchError(f"{value}: download from {url} failed ({_FAILED[url]}){hint}") from None
    if len(raw) > MAX_BYTES:
        raise FetchError(f"{value}: {url} is over {MAX_BYTES:,} bytes; refused")
    return raw


def _keep(raw: bytes, name: str, value: str, sha256: str | None, where: str) -> Path:
    """``raw`` in the cache under its sha256, after checking it against ``sha256``."""
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256:
        raise FetchError(f"{value}: {where} has sha256 {digest[:12]}..., not the pinned "
                         f"{sha256[:12]}...; refused")
    path = _blob(digest, name)
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        _atomic_write(path, raw)
    return path


def _blob(digest: str, name: str) -> Path:
    return cache_dir() / "data" / digest / name


def _atomic_write(path: Path, raw: bytes) -> None:
    """A reader sees the whole file or none: written beside it, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
