"""Load a pipeline file into a validated, typed, ordered DAG.

Every problem found is reported as ``FILE:LINE:COL: error: WHAT``; all of them
at once, none of them as a traceback. Loading imports no torch and runs no code
from the file: ``${vars.X}`` and ``${env:NAME,default}`` are the only
interpolations.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gptflow.errors import InputError, Problem
from gptflow.manager import Plugins
from gptflow.nodes import NodeType, expand_path, path_refs

Key = tuple[str | int, ...]
TOP_KEYS = ("name", "description", "vars", "nodes")
NODE_KEYS = ("plugin", "description", "inputs", "params")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class Ref:
    """An edge: output ``output`` of node ``node``."""

    node: str
    output: str

    def __str__(self) -> str:
        return f"{self.node}.{self.output}"


@dataclass
class Node:
    name: str
    node_type: NodeType
    params: BaseModel
    inputs: dict[str, list[Ref]]  # slot -> producers (one, or several for list slots)
    description: str = ""

    @property
    def plugin(self) -> str:
        return self.node_type.name

    def upstream(self) -> list[str]:
        return list(dict.fromkeys(r.node for refs in self.inputs.values() for r in refs))


@dataclass
class Pipeline:
    name: str
    description: str
    path: Path
    sha256: str
    nodes: dict[str, Node] = field(default_factory=dict)  # in execution order
    overrides: tuple[str, ...] = ()

    def downstream(self, names: Iterable[str]) -> list[str]:
        """``names`` and every node that depends on them, in execution order."""
        reached = set(names)
        for node in self.nodes.values():
            if reached.intersection(node.upstream()):
                reached.add(node.name)
        return [n for n in self.nodes if n in reached]

    def upstream(self, names: Iterable[str]) -> list[str]:
        """``names`` and everything they depend on, in execution order."""
        reached = set(names)
        for node in reversed(list(self.nodes.values())):
            if node.name in reached:
                reached.update(node.upstream())
        return [n for n in self.nodes if n in reached]


class _Loader:
    """Holds the file's marks so every stage can point at a line and column."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = str(path)
        self.marks: dict[Key, tuple[str, int | None, int | None]] = {}  # of values
        self.key_marks: dict[Key, tuple[str, int | None, int | None]] = {}  # of mapping keys
        self.problems: list[Problem] = []

    def error(self, key: Key, message: str, at_key: bool = False) -> None:
        """Report a problem at the value of ``key`` (or at the key itself)."""
        if at_key and key in self.key_marks:
            self.problems.append(Problem(message, *self.key_marks[key]))
            return
        for i in range(len(key), -1, -1):  # the nearest marked ancestor
            if key[:i] in self.marks:
                file, line, col = self.marks[key[:i]]
                break
        else:
            file, line, col = self.file, None, None
        self.problems.append(Problem(message, file, line, col))

    def compose(self, text: str) -> Any:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
            raise InputError([Problem(f"invalid YAML: {e.problem or e.context}",
                                      self.file, line, col)]) from None
        if root is None:
            raise InputError([Problem("the pipeline file is empty", self.file, 1, 1)])
        return self._value(root, ())

    def _value(self, node: yaml.Node, key: Key) -> Any:
        self.marks[key] = (self.file, node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            merged: list[Any] = []
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` (explicit keys win)
                    merged += [self._value(m, key) for m in
                               (v.value if isinstance(v, yaml.SequenceNode) else [v])]
                    continue
                name = str(yaml.safe_load(yaml.serialize(k)))
                self.key_marks[(*key, name)] = (self.file, k.start_mark.line + 1,
                                                k.start_mark.column + 1)
                if name in out:
                    self.error((*key, name), f"duplicate key {name!r}", at_key=True)
                out[name] = self._value(v, (*key, name))
            for extra in merged:
                if not isinstance(extra, dict):
                    self.error(key, "a merge key (<<) takes a mapping")
                    continue
                for name, value in extra.items():
                    out.setdefault(name, value)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._value(v, (*key, i)) for i, v in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))


def load_pipeline(path: str | Path, plugins: Plugins, overrides: Iterable[str] = ()) -> Pipeline:
    """Parse, interpolate, override and validate a pipeline file."""
    path = Path(path)
    loader = _Loader(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError([Problem(f"cannot read pipeline file: {e.strerror}", str(path))]) from None
    data = loader.compose(text)
    if not isinstance(data, dict):
        raise InputError([Problem("a pipeline file is a mapping with name and nodes",
                                  str(path), 1, 1)])
    overrides = tuple(overrides)
    for item in overrides:
        _apply_override(data, item, loader)
    pipeline = Pipeline(name="", description="", path=path, overrides=overrides,
                        sha256=hashlib.sha256(text.encode()).hexdigest())
    _check_keys(loader, data, (), TOP_KEYS, "top-level key")
    pipeline.name = _text(loader, data, ("name",), required=True)
    pipeline.description = _text(loader, data, ("description",))
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        loader.error(("vars",), "vars must be a mapping of names to values")
        variables = {}
    variables = _interpolate(variables, {}, ("vars",), loader)
    nodes = data.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        loader.error(("nodes",) if "nodes" in data else (),
                     "a pipeline needs a 'nodes' mapping with at least one node")
        raise InputError(loader.problems)
    nodes = _interpolate(nodes, variables, ("nodes",), loader)
    if loader.problems:  # later checks would only repeat them
        raise InputError(loader.problems)
    raw: dict[str, Node] = {}
    for name, spec in nodes.items():
        node = _node(loader, plugins, name, spec)
        if node:
            raw[name] = node
    if not loader.problems:
        _check_edges(loader, raw)
    if not loader.problems:
        pipeline.nodes = {n: raw[n] for n in _order(loader, raw)}
    for node in pipeline.nodes.values():
        for loc, value in path_refs(node.params):
            try:
                expand_path(value)
            except FileNotFoundError as e:
                loader.error(("nodes", node.name, "params", *loc), str(e))
    if loader.problems:
        raise InputError(loader.problems)
    return pipeline


def _check_keys(loader: _Loader, data: Mapping[str, Any], key: Key, allowed: Iterable[str],
                what: str) -> None:
    for k in data:
        if k not in allowed:
            loader.error((*key, k), f"unknown {what} {k!r}{_suggest(k, allowed)}", at_key=True)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _text(loader: _Loader, data: Mapping[str, Any], key: Key, required: bool = False) -> str:
    value = data.get(str(key[-1]))
    if value is None:
        if required:
            loader.error((), f"missing required key {key[-1]!r}")
        return ""
    if not isinstance(value, str):
        loader.error(key, f"{key[-1]!r} must be a string")
        return ""
    return value


def _apply_override(data: dict[str, Any], item: str, loader: _Loader) -> None:
    """``--set vars.seed=3`` or ``--set NODE.params.a.b=VALUE``; VALUE is YAML-typed."""
    dotted, sep, value = item.partition("=")
    if not sep or not dotted:
        raise InputError([Problem(f"--set {item!r}: expected PATH=VALUE")])
    parts = dotted.split(".")
    target = data.setdefault("vars", {}) if parts[0] == "vars" else data.get("nodes", {})
    keys = parts[1:] if parts[0] == "vars" else parts
    if parts[0] != "vars" and parts[0] not in target:
        raise InputError([Problem(f"--set {dotted}: no node named {parts[0]!r}"
                                  f"{_suggest(parts[0], target)}")])
    if not isinstance(target, dict) or not keys:
        raise InputError([Problem(f"--set {dotted}: expected vars.NAME or NODE.KEY...")])
    for k in keys[:-1]:
        if not isinstance(target.get(k, {}), dict):
            raise InputError([Problem(f"--set {dotted}: {k!r} is not a mapping")])
        target = target.setdefault(k, {})
    try:
        target[keys[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        target[keys[-1]] = value
    full = ("vars", *keys) if parts[0] == "vars" else ("nodes", *keys)
    loader.marks[full] = (f"--set {dotted}", None, None)


def _interpolate(value: Any, variables: Mapping[str, Any], key: Key, loader: _Loader) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, variables, (*key, k), loader) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, variables, (*key, i), loader) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = INTERPOLATION.fullmatch(value)
    if whole:  # the scalar is one reference: keep the referenced value's type
        return _resolve(whole.group(1), variables, key, loader)
    return INTERPOLATION.sub(lambda m: str(_resolve(m.group(1), variables, key, loader)), value)


def _resolve(expr: str, variables: Mapping[str, Any], key: Key, loader: _Loader) -> Any:
    if expr.startswith("vars."):
        value: Any = variables
        for part in expr[5:].split("."):
            if not isinstance(value, dict) or part not in value:
                known = value if isinstance(value, dict) else {}
                loader.error(key, f"undefined variable ${{{expr}}}{_suggest(part, known)}")
                return None
            value = value[part]
        return value
    if expr.startswith("env:"):
        name, comma, default = expr[4:].partition(",")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            loader.error(key, f"bad environment variable name in ${{{expr}}}")
            return None
        if name in os.environ:
            raw = os.environ[name]
        elif comma:
            raw = default
        else:
            loader.error(key, f"environment variable {name} is not set and ${{{expr}}} "
                              "has no default (write ${env:NAME,default})")
            return None
        try:
            return yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            return raw
    loader.error(key, f"unknown interpolation ${{{expr}}}: only ${{vars.NAME}} and "
                      "${env:NAME,default} are allowed")
    return None


def _node(loader: _Loader, plugins: Plugins, name: str, spec: Any) -> Node | None:
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
                     f"{_suggest(plugin, plugins.node_types)} (see: gptflow plugins)")
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
    return Node(name, node_type, params, refs, str(spec.get("description") or ""))


def _ref(loader: _Loader, key: Key, value: Any) -> Ref | None:
    if not isinstance(value, str) or not value:
        loader.error(key, f"an input is NODE or NODE.OUTPUT, not {value!r}")
        return None
    node, _, output = value.partition(".")
    return Ref(node, output)


def _param_error(loader: _Loader, key: Key, model: type[BaseModel], err: Any) -> None:
    loc = tuple(err["loc"])
    where = (*key, *loc)
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        loader.error(where, f"unknown param {dotted!r}{_suggest(str(loc[-1]), fields)}",
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


def _check_edges(loader: _Loader, nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        slots = node.node_type.inputs
        base: Key = ("nodes", node.name, "inputs")
        for slot, refs in node.inputs.items():
            spec = slots.get(slot)
            if spec is None:
                loader.error((*base, slot), f"node {node.name!r} ({node.plugin}) has no input "
                             f"{slot!r}{_suggest(slot, slots)}; "
                             f"inputs: {', '.join(slots) or 'none'}")
                continue
            if len(refs) > 1 and not spec.many:
                loader.error((*base, slot), f"input {slot!r} takes one artifact, not a list")
            for i, ref in enumerate(refs):
                where = (*base, slot, i) if (*base, slot, i) in loader.marks else (*base, slot)
                _check_ref(loader, nodes, node, ref, spec.types, where)
        for slot, spec in slots.items():
            if not spec.optional and not node.inputs.get(slot):
                loader.error(("nodes", node.name), f"node {node.name!r} ({node.plugin}) needs "
                             f"input {slot!r} ({' or '.join(spec.types)})", at_key=True)


def _check_ref(loader: _Loader, nodes: Mapping[str, Node], node: Node, ref: Ref,
               types: tuple[str, ...], where: Key) -> None:
    producer = nodes.get(ref.node)
    if producer is None:
        loader.error(where, f"input {ref.node!r}: no node named {ref.node!r}"
                     f"{_suggest(ref.node, nodes)}")
        return
    outputs = producer.node_type.outputs
    output = ref.output
    if not output:
        if len(outputs) != 1:
            loader.error(where, f"node {ref.node!r} has outputs {', '.join(outputs)}: "
                         f"write {ref.node}.OUTPUT")
            return
        output = next(iter(outputs))
        node.inputs = {s: [Ref(r.node, output) if r is ref else r for r in rs]
                       for s, rs in node.inputs.items()}
    if output not in outputs:
        loader.error(where, f"node {ref.node!r} ({producer.plugin}) has no output {output!r}"
                     f"{_suggest(output, outputs)}; outputs: {', '.join(outputs)}")
    elif outputs[output] not in types:
        loader.error(where, f"type mismatch: {ref.node}.{output} is a {outputs[output]!r}, "
                     f"but this input takes {' or '.join(repr(t) for t in types)}")


def _order(loader: _Loader, nodes: dict[str, Node]) -> list[str]:
    """Topological order, stable in file order; a cycle is an error that prints it."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(name: str) -> bool:
        if state.get(name) == 2:
            return True
        if state.get(name) == 1:
            cycle = [*stack[stack.index(name):], name]
            loader.error(("nodes", cycle[0]), f"cycle: {' -> '.join(cycle)}", at_key=True)
            return False
        state[name] = 1
        stack.append(name)
        for up in nodes[name].upstream():
            if not visit(up):
                return False
        stack.pop()
        state[name] = 2
        order.append(name)
        return True

    for name in nodes:
        if not visit(name):
            break
    return order
