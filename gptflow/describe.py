"""Describing node types to people and tools: params help and JSON Schema.

The params model of a node is the single source of truth: field docstrings
become `gptflow plugins NAME` help and the pipeline's JSON Schema.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticUndefined
from rich.table import Table

from gptflow.dag import Resources
from gptflow.manager import Plugins
from gptflow.nodes import NodeType


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return "|".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        name = getattr(origin, "__name__", str(origin)).replace("UnionType", "Union")
        return f"{name}[{args}]" if name != "Union" else " | ".join(
            type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def param_rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(dotted name, type, default, doc) for every field, nested models flattened."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield f"{prefix}{name}", annotation.__name__, "", info.description or ""
            yield from param_rows(annotation, f"{prefix}{name}.")
            continue
        if info.is_required():
            default = "required"
        elif info.default_factory is not None:
            default = repr(info.default_factory())  # type: ignore[call-arg]
        else:
            default = repr(info.default) if info.default is not PydanticUndefined else ""
        yield f"{prefix}{name}", type_name(annotation), default, info.description or ""


def pipeline_schema(plugins: Plugins) -> dict[str, Any]:
    """JSON Schema of a pipeline file, with the params of every installed node type."""
    names = sorted(plugins.node_types)
    trackers = sorted(plugins.trackers)
    models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (plugins.node_types[n].node_type.params, "validation") for n in names]
    tracker_models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (plugins.trackers[n].options, "validation") for n in trackers]
    executors = sorted(plugins.executors)
    executor_models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (plugins.executors[n].options, "validation") for n in executors]
    resources: tuple[type[BaseModel], Literal["validation"]] = (Resources, "validation")
    refs, defs = models_json_schema(models + tracker_models + executor_models + [resources],
                                    ref_template="#/$defs/{model}")
    variants = []
    for name, model in zip(names, models, strict=True):
        node_type = plugins.node_types[name].node_type
        variants.append({
            "type": "object",
            "description": node_type.description,
            "properties": {
                "plugin": {"const": name},
                "description": {"type": "string"},
                "inputs": {"type": "object", "additionalProperties": False, "properties": {
                    slot: {"description": f"{' or '.join(spec.types)}; NODE or NODE.OUTPUT",
                           **({"type": "array", "items": {"type": "string"}} if spec.many
                              else {"type": "string"})}
                    for slot, spec in node_type.inputs.items()}},
                "params": refs[model],
                "resources": refs[resources],
            },
            "required": ["plugin"],
            "additionalProperties": False,
        })
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gptflow pipeline",
        "$comment": "any param may also be an interpolation, ${vars.NAME} or ${env:NAME}",
        "type": "object",
        "required": ["name", "nodes"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "vars": {"type": "object", "description": "values used as ${vars.NAME}"},
            "nodes": {"type": "object", "minProperties": 1,
                      "additionalProperties": {"oneOf": variants}},
            "tracking": {"type": "object", "description": "experiment trackers and their "
                         "options (gptflow run --track NAME turns one on too)",
                         "additionalProperties": False,
                         "properties": {n: refs[m] for n, m in zip(trackers, tracker_models,
                                                                     strict=True)}},
            "executor": {"type": "object", "description": "where nodes run: one executor "
                         "and its options (gptflow run --executor NAME replaces it)",
                         "maxProperties": 1, "additionalProperties": False,
                         "properties": {n: refs[m] for n, m in zip(executors, executor_models,
                                                                     strict=True)}},
        },
        "$defs": {name: _interpolable(d) for name, d in defs.get("$defs", {}).items()},
    }


INTERPOLATION = {"type": "string", "pattern": r"\$\{[^}]*\}"}


def _or_interpolation(schema: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {k: schema[k] for k in ("title", "description", "default")
                             if k in schema}
    return {**shown, "anyOf": [_interpolable(schema), INTERPOLATION]}


def _interpolable(schema: Any) -> Any:
    """The schema with an interpolation allowed wherever a param value may stand, as
    `gptflow validate` allows it (the value is checked after interpolating)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _or_interpolation(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _or_interpolation(out[key])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [_interpolable(v) for v in out[key]]
    return out


def node_types_table(plugins: Plugins) -> Table:
    """Every installed node type on one line: slots, version, provider."""
    table = Table(title="node types", title_justify="left")
    for col in ("name", "inputs", "outputs", "version", "from", "description"):
        table.add_column(col, overflow="fold")
    for name in sorted(plugins.node_types):
        registered = plugins.node_types[name]
        nt = registered.node_type
        table.add_row(name, ", ".join(f"{s}: {'|'.join(i.types)}" for s, i in nt.inputs.items()),
                      ", ".join(f"{n}: {t}" for n, t in nt.outputs.items()), nt.version,
                      registered.provider, nt.description.split("\n")[0])
    return table


def plugins_table(plugins: Plugins) -> Table:
    """Every loaded plugin: where it comes from, its hooks, its node types, its import time."""
    table = Table(title="plugins", title_justify="left")
    for column in ("plugin", "from", "hooks", "node types", "import"):
        table.add_column(column)
    for p in plugins.loaded:
        types = [n for n, r in plugins.node_types.items() if r.plugin == p.name]
        table.add_row(p.name, plugins.provider(p.plugin), ", ".join(plugins.hooks(p.plugin)),
                      ", ".join(sorted(types)), f"{p.import_s * 1000:.0f} ms")
    return table


def node_type_tables(nt: NodeType) -> list[Table]:
    """One node type in full: its inputs, outputs and params (types, defaults, docs)."""
    tables = []
    for title, rows in (
        ("inputs", [(s, " | ".join(i.types) + ("[]" if i.many else ""),
                     "optional" if i.optional else "required", i.doc)
                    for s, i in nt.inputs.items()]),
        ("outputs", [(n, t, "", "") for n, t in nt.outputs.items()]),
        ("params", list(param_rows(nt.params))),
    ):
        table = Table(title=title, title_justify="left")
        for col in ("name", "type", "default" if title == "params" else "", "doc"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables
