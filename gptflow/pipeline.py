"""Load a pipeline file into a validated, typed, ordered DAG.

Every problem found is reported as ``FILE:LINE:COL: error: WHAT``; all of them
at once, none of them as a traceback. Loading imports no torch and runs no code
from the file: ``${vars.X}`` and ``${env:NAME,default}`` are the only
interpolations.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gptflow.dag import Node, Pipeline, Ref, Resources, link, order
from gptflow.errors import InputError, Problem, did_you_mean
from gptflow.interpolate import apply_override, interpolate
from gptflow.manager import Plugins
from gptflow.nodes import path_refs
from gptflow.sources import check_source
from gptflow.yamlfile import Key, MarkedYAML

TOP_KEYS = ("name", "description", "vars", "nodes", "tracking", "executor")
NODE_KEYS = ("plugin", "description", "inputs", "params", "resources")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def load_pipeline(path: str | Path, plugins: Plugins, overrides: Iterable[str] = (),
                  track: Iterable[str] = (), executor: str | None = None,
                  executor_opts: Iterable[str] = ()) -> Pipeline:
    """Parse, interpolate, override and validate a pipeline file; ``track`` turns on
    more trackers (``gptflow run --track NAME``) with their default options;
    ``executor`` and ``executor_opts`` (KEY=VALUE) replace the ``executor:`` block
    (``gptflow run --executor NAME --executor-opt KEY=VALUE``)."""
    path = Path(path)
    loader = MarkedYAML(str(path))
    try:
        content = path.read_bytes()
        text = content.decode("utf-8")
    except OSError as e:
        raise InputError([Problem(f"cannot read pipeline file: {e.strerror}", str(path))]) from None
    except UnicodeDecodeError as e:
        line = content[: e.start].count(b"\n") + 1
        raise InputError([Problem(f"not UTF-8 text (byte {content[e.start:e.start + 1]!r})",
                                  str(path), line)]) from None
    data = loader.compose(text)
    if not isinstance(data, dict):
        raise InputError([Problem("a pipeline file is a mapping with name and nodes",
                                  str(path), 1, 1)])
    overrides = tuple(overrides)
    for item in overrides:
        apply_override(data, item, loader)
    pipeline = Pipeline(name="", description="", path=path, overrides=overrides,
                        sha256=hashlib.sha256(text.encode()).hexdigest())
    _check_keys(loader, data, (), TOP_KEYS, "top-level key")
    pipeline.name = _text(loader, data, ("name",), required=True)
    pipeline.description = _text(loader, data, ("description",))
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        loader.error(("vars",), "vars must be a mapping of names to values")
        variables = {}
    variables = interpolate(variables, {}, ("vars",), loader)
    nodes = data.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        loader.error(("nodes",) if "nodes" in data else (),
                     "a pipeline needs a 'nodes' mapping with at least one node")
        raise InputError(loader.problems)
    nodes = interpolate(nodes, variables, ("nodes",), loader)
    tracking = data.get("tracking") or {}
    if not isinstance(tracking, dict):
        loader.error(("tracking",), "tracking is a mapping of tracker names to options")
        tracking = {}
    tracking = interpolate(tracking, variables, ("tracking",), loader)
    for name in track:
        tracking.setdefault(name, {})
    pipeline.tracking = _trackers(loader, plugins, tracking)
    pipeline.executor = _executor(loader, plugins, data.get("executor"), variables, executor,
                                  executor_opts)
    if loader.problems:  # later checks would only repeat them
        raise InputError(loader.problems)
    raw: dict[str, Node] = {}
    for name, spec in nodes.items():
        node = _node(loader, plugins, name, spec)
        if node:
            raw[name] = node
    if not loader.problems:
        raw = link(loader, raw)
    if not loader.problems:
        pipeline.nodes = {n: raw[n] for n in order(loader, raw)}
    for node in pipeline.nodes.values():
        for loc, value, ref in path_refs(node.params):
            problem = check_source(value, ref.builtins, node.folder)
            if problem:
                loader.error(("nodes", node.name, "params", *loc), problem)
    if loader.problems:
        raise InputError(loader.problems)
    return pipeline


def _check_keys(loader: MarkedYAML, data: Mapping[str, Any], key: Key, allowed: Iterable[str],
                what: str) -> None:
    for k in data:
        if k not in allowed:
            loader.error((*key, k), f"unknown {what} {k!r}{did_you_mean(k, allowed)}", at_key=True)


def _text(loader: MarkedYAML, data: Mapping[str, Any], key: Key, required: bool = False) -> str:
    value = data.get(str(key[-1]))
    if value is None:
        if required:
            loader.error((), f"missing required key {key[-1]!r}")
        return ""
    if not isinstance(value, str):
        loader.error(key, f"{key[-1]!r} must be a string")
        return ""
    return value


def _trackers(loader: MarkedYAML, plugins: Plugins, tracking: dict[str, Any]
              ) -> dict[str, dict[str, Any]]:
    """Each tracker's options, validated by the model its plugin registered."""
    valid = {}
    for name, options in tracking.items():
        key: Key = ("tracking", name)
        tracker = plugins.trackers.get(name)
        if tracker is None:
            loader.error(key, f"unknown tracker {name!r}{did_you_mean(name, plugins.trackers)}"
                         f"; installed: {', '.join(plugins.trackers) or 'none'}", at_key=True)
            continue
        if options is not None and not isinstance(options, dict):
            loader.error(key, f"tracking.{name} is a mapping of options")
            continue
        try:
            valid[name] = tracker.options.model_validate(options or {}).model_dump(mode="json")
        except ValidationError as e:
            for err in e.errors():
                _param_error(loader, key, tracker.options, err)
    return valid


def _executor(loader: MarkedYAML, plugins: Plugins, block: Any, variables: Mapping[str, Any],
              choice: str | None, opts: Iterable[str]) -> tuple[str, dict[str, Any]]:
    """The executor and its validated options: ``executor: {NAME: {options}}`` in the
    file, its name replaced by ``choice``, options set by ``opts`` (KEY=VALUE)."""
    key: Key = ("executor",)
    if block is None:
        block = {}
    if not isinstance(block, dict) or len(block) > 1:
        loader.error(key, "executor is one mapping entry, e.g. executor: {ray: {address: auto}}")
        block = {}
    name, options = next(iter(block.items()), ("local", {}))
    if choice is not None and choice != name:
        name, options = choice, {}
        loader.marks[(*key, name)] = (f"--executor {name}", None, None)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        loader.error((*key, name), f"executor.{name} is a mapping of options")
        options = {}
    options = interpolate(options, variables, (*key, name), loader)
    for item in opts:
        option, eq, value = item.partition("=")
        if not eq or not option:
            loader.error((), f"--executor-opt {item!r}: write KEY=VALUE")
            continue
        options[option] = yaml.safe_load(value) if value.strip() else value
        loader.marks[(*key, name, option)] = (f"--executor-opt {option}", None, None)
    registered = plugins.executors.get(name)
    if registered is None:
        loader.error((*key, name), f"unknown executor {name!r}"
                     f"{did_you_mean(name, plugins.executors)}; installed: "
                     f"{', '.join(plugins.executors) or 'none'}", at_key=choice != name)
        return "local", {}
    try:
        valid = registered.options.model_validate(options).model_dump(mode="json")
    except ValidationError as e:
        for err in e.errors():
            _param_error(loader, (*key, name), registered.options, err)
        return name, {}
    return name, valid


def _node(loader: MarkedYAML, plugins: Plugins, name: str, spec: Any) -> Node | None:
    key: Key = ("nodes", name)
    if not NAME.match(name):
        loader.error(key, f"bad node name {name!r}: use letters, digits, '_' and '-'")
        return None
    if not isinstance(spec, dict):
        loader.error(key, f"node {name!r} must be a mapping with 'plugin' and 'params'")
        return None
    _check_keys(loader, spec, key, NODE_KEYS, f"key in node {name!r}")
    plugin = spec.get("plugin")
    if not isinstance(plugin, str):
        loader.error(key, f"node {name!r} has no 'plugin'")
        return None
    registered = plugins.node_types.get(plugin)
    if registered is None:
        loader.error((*key, "plugin"), f"unknown plugin {plugin!r}"
                     f"{did_you_mean(plugin, plugins.node_types)} (see: gptflow plugins)")
        return None
    node_type = registered.node_type
    params_raw = spec.get("params") or {}
    if not isinstance(params_raw, dict):
        loader.error((*key, "params"), "params must be a mapping")
        return None
    try:
        params = node_type.params.model_validate(params_raw)
    except ValidationError as e:
        for err in e.errors():
            _param_error(loader, (*key, "params"), node_type.params, err)
        return None
    inputs = spec.get("inputs") or {}
    if not isinstance(inputs, dict):
        loader.error((*key, "inputs"), "inputs must be a mapping of slot: NODE.OUTPUT")
        return None
    refs: dict[str, list[Ref]] = {}
    for slot, value in inputs.items():
        items = value if isinstance(value, list) else [value]
        parsed = [_ref(loader, (*key, "inputs", slot) + ((i,) if isinstance(value, list) else ()),
                       item) for i, item in enumerate(items)]
        refs[slot] = [r for r in parsed if r]
    resources = spec.get("resources") or {}
    if not isinstance(resources, dict):
        loader.error((*key, "resources"), "resources is a mapping: {cpus, gpus, memory}")
        return None
    try:
        asked = Resources.model_validate(resources)
    except ValidationError as e:
        for err in e.errors():
            _param_error(loader, (*key, "resources"), Resources, err)
        return None
    return Node(name, node_type, params, refs, str(spec.get("description") or ""),
                asked.filled(params), Path(loader.file).absolute().parent)


def _ref(loader: MarkedYAML, key: Key, value: Any) -> Ref | None:
    if not isinstance(value, str) or not value:
        loader.error(key, f"an input is NODE or NODE.OUTPUT, not {value!r}")
        return None
    node, _, output = value.partition(".")
    return Ref(node, output)


def _param_error(loader: MarkedYAML, key: Key, model: type[BaseModel], err: Any) -> None:
    loc = tuple(err["loc"])
    where = (*key, *loc)
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        loader.error(where, f"unknown param {dotted!r}{did_you_mean(str(loc[-1]), fields)}",
                     at_key=True)
    elif err["type"] == "missing":
        loader.error(key, f"missing required param {dotted!r}")
    else:
        message = err["msg"].removeprefix("Value error, ")
        named = re.match(r"(\w+): (.*)", message)  # a cross-field check naming its key
        if named and named.group(1) in _fields_at(model, loc):
            loc, message = (*loc, named.group(1)), named.group(2)
            where, dotted = (*key, *loc), ".".join(str(p) for p in loc)
        got = err.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        label = f"param {dotted!r}: " if dotted else "params: "
        loader.error(where, f"{label}{message}{shown}")


def _fields_at(model: Any, loc: Key) -> list[str]:
    for part in loc:
        field_info = getattr(model, "model_fields", {}).get(part)
        model = field_info.annotation if field_info else None
    return list(getattr(model, "model_fields", {}))


