"""Params values to data: ``builtin:`` names through the one registry in
:mod:`gptflow.sources`, everything else as files, folders and globs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl

from gptflow.ml import corpora
from gptflow.ml.data import SplitBy, file_documents
from gptflow.ml.tasks import Task, load_conversations, load_task_files, sentiment4
from gptflow.sources import (
    builtin_name,
    check_builtin,
    expand_path,
    hub_options,
    hub_ref,
    is_builtin,
    is_hub,
)

# implementations of the registry's corpus and tasks entries (a test keeps them in step)
CORPORA: dict[str, Callable[[], Iterator[str]]] = {
    "python-docs": corpora.python_docs, "reviews": corpora.reviews}
TASKS: dict[str, Callable[..., Task]] = {"sentiment4": sentiment4}


def documents(source: str, text_field: str = "text", split_by: SplitBy = "file"
              ) -> Iterator[str]:
    """The documents of one corpus source (``builtin:python-docs``, files, ...)."""
    if is_builtin(source):
        _check(source, "corpus")
        yield from CORPORA[builtin_name(source)[0]]()
        return
    yield from file_documents(expand_path(source), text_field, split_by)


def tasks(source: str, fields: tuple[str, str, str] = ("instruction", "input", "output")
          ) -> list[Task]:
    """The tasks of one source: ``builtin:sentiment4?n=..``, NI task files, .jsonl, ..."""
    if is_builtin(source):
        _check(source, "tasks")
        name, query = builtin_name(source)
        return [TASKS[name](**dict(parse_qsl(query)))]
    return load_task_files(expand_path(source), fields)


def conversations(source: str, split: str) -> list[list[dict[str, str]]]:
    """The chat conversations of ``split`` in .jsonl files (or folders of them)."""
    files = [f for path in expand_path(source)
             for f in (sorted(path.rglob("*.jsonl")) if path.is_dir() else [path])]
    return [c for f in files for c in load_conversations(f, split)]


def model_path(value: str) -> Path:
    """A local path, or the cached snapshot of a ``hf:org/name@revision`` model."""
    if is_hub(value):
        from gptflow.ml.hub import snapshot

        return snapshot(*hub_ref(value), **hub_options())
    return Path(value)


def _check(source: str, kind: str) -> None:
    problem = check_builtin(source, (kind,))
    if problem:
        raise ValueError(problem)

