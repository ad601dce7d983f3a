"""``--set`` overrides and the two interpolations, ``${vars.X}`` and
``${env:NAME,default}``: no code is evaluated. A list item that is one reference
to a list is replaced by that list's items (``corpus: [builtin:python-docs,
"${vars.tasks}"]``), as GitLab CI splices a ``!reference``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from gptflow.errors import InputError, Problem, did_you_mean
from gptflow.yamlfile import Key, MarkedYAML

INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def apply_override(data: dict[str, Any], item: str, loader: MarkedYAML) -> None:
    """``--set vars.seed=3`` or ``--set NODE.params.a.b=VALUE``; VALUE is YAML-typed."""
    dotted, sep, value = item.partition("=")
    if not sep or not dotted:
        raise InputError([Problem(f"--set {item!r}: expected PATH=VALUE")])
    parts = dotted.split(".")
    target = data.setdefault("vars", {}) if parts[0] == "vars" else data.get("nodes", {})
    keys = parts[1:] if parts[0] == "vars" else parts
    if parts[0] != "vars" and parts[0] not in target:
        raise InputError([Problem(f"--set {dotted}: no node named {parts[0]!r}"
                                  f"{did_you_mean(parts[0], target)}")])
    if not isinstance(target, dict) or not keys:
        raise InputError([Problem(f"--set {dotted}: expected vars.NAME or NODE.KEY...")])
    for k in keys[:-1]:
        if not isinstance(target.get(k, {}), dict):
            raise InputError([Problem(f"--set {dotted}: {k!r} is not a mapping")])
        target = target.setdefault(k, {})
    target[keys[-1]] = MarkedYAML(f"--set {dotted}").load(value)
    full = ("vars", *keys) if parts[0] == "vars" else ("nodes", *keys)
    loader.marks[full] = (f"--set {dotted}", None, None)


def interpolate(value: Any, variables: Mapping[str, Any], key: Key, loader: MarkedYAML) -> Any:
    if isinstance(value, dict):
        return {k: interpolate(v, variables, (*key, k), loader) for k, v in value.items()}
    if isinstance(value, list):  # an item that is one reference to a list: its items
        items: list[Any] = []
        for i, v in enumerate(value):
            resolved = interpolate(v, variables, (*key, i), loader)
            if isinstance(resolved, list) and isinstance(v, str) and INTERPOLATION.fullmatch(v):
                items.extend(resolved)
            else:
                items.append(resolved)
        return items
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = INTERPOLATION.fullmatch(value)
    if whole:  # the scalar is one reference: keep the referenced value's type
        return _resolve(whole.group(1), variables, key, loader)
    return INTERPOLATION.sub(lambda m: str(_resolve(m.group(1), variables, key, loader)), value)


def _resolve(expr: str, variables: Mapping[str, Any], key: Key, loader: MarkedYAML) -> Any:
    if expr.startswith("vars."):
        value: Any = variables
        for part in expr[5:].split("."):
            if not isinstance(value, dict) or part not in value:
                known = value if isinstance(value, dict) else {}
                loader.error(key, f"undefined variable ${{{expr}}}{did_you_mean(part, known)}")
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
        return MarkedYAML(f"${{env:{name}}}").load(raw) if raw.strip() else raw
    loader.error(key, f"unknown interpolation ${{{expr}}}: only ${{vars.NAME}} and "
                      "${env:NAME,default} are allowed")
    return None
