"""What a node type declares, and what its run() receives.

A node type is a small declared object, not a class to inherit from. Declaring
one imports no torch: heavy imports happen inside ``run``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

ARTIFACT_TYPES = ("tokenizer", "tokens", "model", "adapter", "dataset", "report")


class Params(BaseModel):
    """The base of a node's params model: unknown keys and non-finite numbers are
    errors, field docstrings are the help of ``gptflow plugins NAME`` and the JSON
    Schema."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              allow_inf_nan=False)


@dataclass(frozen=True)
class Input:
    """An input slot: the artifact type(s) it accepts, whether it may be absent,
    whether it takes a list of upstream outputs."""

    types: tuple[str, ...]
    optional: bool = False
    many: bool = False
    doc: str = ""

    def __init__(self, *types: str, optional: bool = False, many: bool = False,
                 doc: str = "") -> None:
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "optional", optional)
        object.__setattr__(self, "many", many)
        object.__setattr__(self, "doc", doc)


@dataclass(frozen=True)
class Artifact:
    """A published artifact as a downstream node sees it."""

    path: Path
    type: str
    fingerprint: str
    producer: str  # the pipeline node that made it
    meta: Mapping[str, Any] = field(default_factory=dict)


class Context(Protocol):
    """What the runner hands to ``run``: where to write, where to keep state."""

    node: str
    fingerprint: str
    work_dir: Path  # survives crashes, keyed by fingerprint: checkpoints go here
    log_dir: Path  # outlives the node, under its run: tracker files (TensorBoard, W&B)
    log: logging.Logger

    def output_dir(self, name: str) -> Path:
        """The private folder to write output ``name`` into (published on success)."""

    def progress(self, completed: float, total: float | None = None, text: str = "") -> None:
        """Report progress of long work to the live display."""

    def set_meta(self, output: str, **meta: Any) -> None:
        """Attach JSON metadata to an output's artifact.json."""

    def warn(self, message: str) -> None:
        """Tell the user something that does not fail the node (shown after the
        run's summary, kept in run.json and the node's log)."""

    def training_callbacks(self) -> list[Any]:
        """Lightning callbacks that plugins add to every training node."""


Metrics = Mapping[str, float | int | str]
RunFn = Callable[[Context, dict[str, Any], Any], "Metrics | None"]


@dataclass(frozen=True)
class NodeType:
    """A node type: its slots, its params model, a version that is part of the
    cache key (bump it when outputs would change), and ``run``."""

    name: str
    run: RunFn
    params: type[BaseModel]
    outputs: Mapping[str, str]
    inputs: Mapping[str, Input] = field(default_factory=dict)
    version: str = "1"
    description: str = ""
    headline: tuple[str, ...] = ()  # the few metrics the summary table shows (all: --json)

    def __post_init__(self) -> None:
        """Refuse at registration what would fail later, naming the node type."""
        problem = _shape_problem(self)
        if problem:
            raise ValueError(f"node type {self.name!r}: {problem}")
        for slot in self.inputs.values():
            _check_types(self.name, slot.types)
        _check_types(self.name, tuple(self.outputs.values()))


def _shape_problem(t: NodeType) -> str | None:
    if not isinstance(t.name, str) or not t.name:
        return "name must be a non-empty string"
    if not (isinstance(t.params, type) and issubclass(t.params, BaseModel)):
        return f"params must be a pydantic model (a gptflow.Params subclass), got {t.params!r}"
    if t.params.model_config.get("extra") != "forbid":
        return (f"params model {t.params.__name__} lets unknown keys through (a typo would be "
                "ignored silently): subclass gptflow.Params, or set extra='forbid'")
    if not isinstance(t.version, str):
        return f"version must be a string, got {t.version!r}"
    if not isinstance(t.outputs, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in t.outputs.items()):
        return "outputs must map output names to artifact types, e.g. {'model': 'model'}"
    if not isinstance(t.inputs, Mapping):
        return "inputs must map slot names to gptflow.Input(...)"
    for slot, spec in t.inputs.items():
        if not isinstance(spec, Input):
            return f"input {slot!r} must be a gptflow.Input(...), got {spec!r}"
    if not (isinstance(t.headline, tuple | list) and all(isinstance(h, str) for h in t.headline)):
        return "headline must be a tuple of metric names"
    try:
        inspect.signature(t.run).bind(None, None, None)
    except (TypeError, ValueError):
        return "run must be a function of (context, inputs, params)"
    return None


def _check_types(node: str, types: tuple[str, ...]) -> None:
    unknown = [t for t in types if t not in ARTIFACT_TYPES]
    if unknown:
        raise ValueError(f"node type {node!r}: unknown artifact type(s) {unknown}; "
                         f"known: {', '.join(ARTIFACT_TYPES)}")


class PathRef:
    """Marks a params field whose value names local files, folders or globs:
    their content becomes part of the node's fingerprint.

    Use as ``Annotated[str, PathRef()]``; ``PathRef("corpus")`` also accepts the
    ``builtin:`` sources of that kind (see :mod:`gptflow.sources`).
    """

    def __init__(self, *builtins: str) -> None:
        self.builtins = builtins

    def __repr__(self) -> str:
        return f"PathRef({', '.join(map(repr, self.builtins))})"


class ObserveOnly:
    """Marks a params field that changes what is watched, not what is computed
    (loggers, logging and checkpoint intervals, progress): it is left out of the
    node's fingerprint, so changing it re-runs nothing.

    Use as ``Annotated[int, ObserveOnly()]``.
    """

    def __repr__(self) -> str:
        return "ObserveOnly()"


Loc = tuple[str | int, ...]


def split_observed(params: BaseModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the params that are fingerprinted, the observe-only ones by dotted name)."""
    computed: dict[str, Any] = params.model_dump(mode="json")
    observed: dict[str, Any] = {}

    def walk(model: BaseModel, into: dict[str, Any], prefix: str) -> None:
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if any(isinstance(m, ObserveOnly) for m in info.metadata):
                observed[prefix + name] = into.pop(name)
            elif isinstance(value, BaseModel):
                walk(value, into[name], f"{prefix}{name}.")

    walk(params, computed, "")
    return computed, observed


def path_refs(params: BaseModel, loc: Loc = ()) -> list[tuple[Loc, str, PathRef]]:
    """Every (location, value, marker) in ``params`` that a :class:`PathRef` field names."""
    found: list[tuple[Loc, str, PathRef]] = []
    for name, info in type(params).model_fields.items():
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            found += path_refs(value, (*loc, name))
            continue
        ref = _path_ref([*info.metadata, info.annotation])
        if ref is not None:
            values = value if isinstance(value, list) else [value]
            found += [((*loc, name, i) if isinstance(value, list) else (*loc, name), v, ref)
                      for i, v in enumerate(values) if isinstance(v, str)]
    return found


def _path_ref(marks: list[Any]) -> PathRef | None:
    for mark in marks:
        if isinstance(mark, PathRef):
            return mark
        nested = [*getattr(mark, "__metadata__", ()), *getattr(mark, "__args__", ())]
        found = _path_ref(nested) if nested else None
        if found is not None:
            return found
    return None
