"""Fingerprints and decisions: which nodes run, which are cached, and why.

The fingerprint of a node is the sha256 of its plugin name and version, its
validated params in canonical JSON, the *content* digests of its inputs, and the
content of every file or folder its params point to. So an upstream node that
re-runs and produces different bytes re-runs everything below it, and one that
produces the same bytes re-runs nothing (early cutoff, as Bazel does). Below a
node that must run, the digests exist only once it has: such steps are
``pending`` until :func:`resolve` gives them their fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gptflow.dag import Node, Pipeline, Ref
from gptflow.errors import InputError, Problem, did_you_mean
from gptflow.fetch import digest, is_named
from gptflow.nodes import path_refs, split_observed
from gptflow.sources import (
    PACKAGE,
    builtin_version,
    expand_path,
    hub_commit,
    is_builtin,
    is_hub,
    is_package,
    package_path,
)
from gptflow.store import CorruptArtifact, Store, canonical_json

FINGERPRINT_CHARS = 32


@dataclass
class Step:
    node: Node
    fingerprint: str  # provisional while pending: never published under
    manifest: dict[str, Any]
    action: Literal["run", "cached"]
    reason: str
    pending: bool = False  # below a node that runs: resolved once its inputs exist
    previous: dict[str, Any] | None = None  # the manifest of its last run, for "why"


def manifest(node: Node, upstream: Callable[[Ref], str], store: Store) -> dict[str, Any]:
    """Everything a node's fingerprint is made of, kept so `plan` can say what changed;
    ``upstream`` names each input (its content digest)."""
    files: dict[str, dict[str, str]] = {}
    for _, value, _ in path_refs(node.params):
        if is_hub(value):
            files[value] = {"commit": hub_commit(value)}
        elif is_builtin(value):
            files[value] = {"version": builtin_version(value)}
        elif is_named(value):  # by content, wherever it came from
            files[value] = {"sha256": digest(value)}
        else:
            files[value] = {_named(p, node.folder, value): store.hash_path(p)
                            for p in expand_path(value, node.folder)}
    params, observed = split_observed(node.params)
    return {
        "plugin": node.plugin,
        "version": node.node_type.version,
        "params": params,
        "observed": observed,  # kept for `plan`, never fingerprinted
        "inputs": {slot: [upstream(r) for r in refs] for slot, refs in sorted(node.inputs.items())},
        "files": files,
    }


def _named(path: Path, folder: Path, value: str) -> str:
    """A file as the fingerprint names it: relative to the pipeline's folder when the
    value is, or to its package's, so the same project elsewhere has the same
    fingerprints."""
    if is_package(value):
        package = value.removeprefix(PACKAGE).partition("/")[0]
        root = package_path(f"{PACKAGE}{package}/")
        return f"{PACKAGE}{package}/{path.relative_to(root).as_posix()}"
    return (path if Path(value).is_absolute() else path.relative_to(folder)).as_posix()


def fingerprint(parts: dict[str, Any]) -> str:
    """The cache key: everything in the manifest but the observe-only params."""
    hashed = {k: v for k, v in parts.items() if k != "observed"}
    return hashlib.sha256(canonical_json(hashed).encode()).hexdigest()[:FINGERPRINT_CHARS]


def make_plan(pipeline: Pipeline, store: Store, only: Collection[str] = (),
              start: Collection[str] = (), force: Collection[str] | None = None) -> list[Step]:
    """Decide every node's action. ``force=()`` forces all selected nodes."""
    for flag, names in (("--only", only), ("--from", start), ("--force", force or ())):
        for name in names:
            if name not in pipeline.nodes:
                raise InputError([Problem(f"{flag} {name}: no node named {name!r}"
                                          f"{did_you_mean(name, pipeline.nodes)}",
                                          str(pipeline.path))])
    selected = set(pipeline.nodes)
    if only:
        selected &= set(only)
    if start:
        selected &= set(pipeline.downstream(start))
    forced = selected if force is not None and not force else set(force or ())
    needed = set(pipeline.upstream(selected))
    fingerprints: dict[str, str] = {}
    published: set[str] = set()  # nodes whose outputs exist now: their digests are known
    steps = []
    previous = _previous_manifests(store, pipeline.name)

    def input_id(ref: Ref) -> str:
        if ref.node in published:
            with contextlib.suppress(CorruptArtifact):  # the run refuses it, naming it
                return store.digest(fingerprints[ref.node], ref.output)
        return f"pending:{fingerprints[ref.node]}/{ref.output}"

    for node in pipeline.nodes.values():
        parts = manifest(node, input_id, store)
        fp = fingerprints[node.name] = fingerprint(parts)
        if node.name not in needed:
            continue
        pending = not all(u in published for u in node.upstream())
        if pending and node.name in selected:
            ups = ", ".join(u for u in node.upstream() if u not in published)
            reason = "forced" if node.name in forced else \
                f"after {ups}: cached if its outputs come out unchanged"
            steps.append(Step(node, fp, parts, "run", reason, True, previous.get(node.name)))
        elif node.name in forced:
            steps.append(Step(node, fp, parts, "run", "forced"))
        elif store.has(fp):
            published.add(node.name)
            steps.append(Step(node, fp, parts, "cached", _why_cached(parts, store, fp)))
        elif node.name in selected:
            steps.append(Step(node, fp, parts, "run", _why(parts, previous.get(node.name))))
        else:
            flag = "--only" if only else "--from"
            raise InputError([Problem(f"node {node.name!r} is needed but not selected by {flag} "
                                      "and has no cached output; select it too",
                                      str(pipeline.path))])
    return steps


def resolve(step: Step, store: Store, fingerprints: Mapping[str, str]) -> Step:
    """A pending step once its inputs are published: its real fingerprint, and
    cached when those inputs are the very bytes it last ran on (early cutoff)."""
    parts = manifest(step.node, lambda r: store.digest(fingerprints[r.node], r.output), store)
    fp = fingerprint(parts)
    if step.reason == "forced":
        return Step(step.node, fp, parts, "run", "forced")
    if store.has(fp):
        return Step(step.node, fp, parts, "cached",
                    "its inputs came out unchanged: " + _why_cached(parts, store, fp))
    return Step(step.node, fp, parts, "run", _why(parts, step.previous))


def _previous_manifests(store: Store, pipeline: str, runs: int = 20) -> dict[str, dict[str, Any]]:
    """The manifests of each node's most recent artifact in this pipeline's past runs."""
    found: dict[str, dict[str, Any]] = {}
    records, _ = store.runs(store.run_ids()[-runs:])  # a damaged record only loses its "why"
    for record in reversed(records):
        if record.pipeline.name != pipeline:
            continue
        for name, node in record.nodes.items():
            if name not in found and store.has(node.fingerprint):
                with contextlib.suppress(CorruptArtifact):
                    found[name] = store.node_record(node.fingerprint).manifest
    return found


def _why(new: dict[str, Any], old: dict[str, Any] | None) -> str:
    if old is None:
        return "not run before"
    if old["plugin"] != new["plugin"]:
        return f"plugin changed: {old['plugin']} -> {new['plugin']}"
    if old["version"] != new["version"]:
        return f"plugin version {old['version']} -> {new['version']}"
    changed = _changed_keys(old["params"], new["params"])
    if changed:
        return "params changed: " + ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    slots = [s for s in set(old["inputs"]) | set(new["inputs"])
             if old["inputs"].get(s) != new["inputs"].get(s)]
    if slots:
        return "upstream changed: " + ", ".join(sorted(slots))
    files = [f for f in set(old["files"]) | set(new["files"])
             if old["files"].get(f) != new["files"].get(f)]
    if files:
        return "data changed: " + ", ".join(sorted(files))
    return "output missing"


def _why_cached(new: dict[str, Any], store: Store, fp: str) -> str:
    try:
        old = store.node_record(fp).manifest.get("observed", {})
    except CorruptArtifact as e:
        return f"same fingerprint, but its record is damaged ({e})"
    changed = sorted(k for k in set(old) | set(new["observed"])
                     if old.get(k) != new["observed"].get(k))
    if changed:
        return f"same fingerprint (observe-only params changed: {', '.join(changed)})"
    return "same fingerprint"


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: Iterable[str] = sorted(set(old) | set(new))
        return [k for key in keys
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []
