"""The pipeline as a graph: nodes, the edges their inputs make, the checks
on those edges, and the execution order (topological, stable in file order)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, WithJsonSchema, field_validator

from gptflow.errors import did_you_mean
from gptflow.nodes import NodeType, Params
from gptflow.yamlfile import Key, MarkedYAML


@dataclass(frozen=True)
class Ref:
    """An edge: output ``output`` of node ``node``."""

    node: str
    output: str

    def __str__(self) -> str:
        return f"{self.node}.{self.output}"


MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class Resources(Params):
    """What a node asks of an executor (``resources:`` on a node; never part of its
    fingerprint). Unset values follow the node's ``trainer`` settings: ``devices``
    GPUs when it trains on GPUs, ``devices`` CPUs when on CPUs, else one CPU."""

    cpus: float | None = Field(None, gt=0)
    """CPU cores; also the node's torch threads (OMP_NUM_THREADS) under Ray."""
    gpus: float | None = Field(None, ge=0)
    """GPUs (fractions share one)."""
    memory: Annotated[int | None, WithJsonSchema({"anyOf": [
        {"type": "integer", "exclusiveMinimum": 0}, {"type": "string"}, {"type": "null"}]})
    ] = Field(None, gt=0)
    """Memory in bytes, or with a unit: 512MB, 8GiB."""

    @field_validator("memory", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        if isinstance(value, str):
            number = value.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz")
            unit = value.strip().lower()[len(number):]
            if unit not in MEMORY_UNITS or not number.strip():
                raise ValueError(f"{value!r}: write bytes, or a number with a unit "
                                 "(MB, GB, MiB, GiB)")
            return int(float(number) * MEMORY_UNITS[unit])
        return value

    def filled(self, params: BaseModel) -> Resources:
        """These resources with what is unset taken from the params' trainer."""
        trainer = getattr(params, "trainer", None)
        devices = getattr(trainer, "devices", 1)
        count = devices if isinstance(devices, int) and devices > 0 else 1
        on_gpu = getattr(trainer, "accelerator", "cpu") in ("gpu", "cuda")
        return Resources(cpus=self.cpus or (1 if on_gpu else count),
                         gpus=self.gpus if self.gpus is not None else (count if on_gpu else 0),
                         memory=self.memory)


@dataclass
class Node:
    name: str
    node_type: NodeType
    params: BaseModel
    inputs: dict[str, list[Ref]]  # slot -> producers (one, or several for list slots)
    description: str = ""
    resources: Resources = field(default_factory=Resources)  # filled from the trainer
    folder: Path = field(default_factory=Path)  # relative paths in params start here

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
    tracking: dict[str, dict[str, Any]] = field(default_factory=dict)  # tracker -> options
    executor: tuple[str, dict[str, Any]] = ("local", {})  # name, validated options

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


def pick_output(node: str, output: str, outputs: Iterable[str], what: str = "") -> str:
    """The one rule for ``NODE`` and ``NODE.OUTPUT``: a bare node name means its only
    output. Raises ValueError saying what to write instead (``what``: the node's plugin,
    named in the message)."""
    outputs = list(outputs)
    if not output:
        if len(outputs) != 1:
            raise ValueError(f"node {node!r} has outputs {', '.join(outputs)}: "
                             f"write {node}.OUTPUT")
        return outputs[0]
    if output not in outputs:
        raise ValueError(f"node {node!r}{f' ({what})' if what else ''} has no output {output!r}"
                         f"{did_you_mean(output, outputs)}; outputs: {', '.join(outputs)}")
    return output


def link(loader: MarkedYAML, nodes: dict[str, Node]) -> dict[str, Node]:
    """Check every edge (slots, producers, outputs, types) and return the nodes with
    each input spelled in full as NODE.OUTPUT."""
    linked = {}
    for node in nodes.values():
        slots = node.node_type.inputs
        base: Key = ("nodes", node.name, "inputs")
        inputs: dict[str, list[Ref]] = {}
        for slot, refs in node.inputs.items():
            spec = slots.get(slot)
            if spec is None:
                loader.error((*base, slot), f"node {node.name!r} ({node.plugin}) has no input "
                             f"{slot!r}{did_you_mean(slot, slots)}; "
                             f"inputs: {', '.join(slots) or 'none'}")
                continue
            if len(refs) > 1 and not spec.many:
                loader.error((*base, slot), f"input {slot!r} takes one artifact, not a list")
            inputs[slot] = []
            for i, ref in enumerate(refs):
                where = (*base, slot, i) if (*base, slot, i) in loader.marks else (*base, slot)
                full = _link_ref(loader, nodes, ref, spec.types, where)
                if full is not None:
                    inputs[slot].append(full)
        for slot, spec in slots.items():
            if not spec.optional and not node.inputs.get(slot):
                loader.error(("nodes", node.name), f"node {node.name!r} ({node.plugin}) needs "
                             f"input {slot!r} ({' or '.join(spec.types)})", at_key=True)
        linked[node.name] = replace(node, inputs=inputs)
    return linked


def _link_ref(loader: MarkedYAML, nodes: Mapping[str, Node], ref: Ref,
              types: tuple[str, ...], where: Key) -> Ref | None:
    producer = nodes.get(ref.node)
    if producer is None:
        loader.error(where, f"input {ref.node!r}: no node named {ref.node!r}"
                     f"{did_you_mean(ref.node, nodes)}")
        return None
    outputs = producer.node_type.outputs
    try:
        output = pick_output(ref.node, ref.output, outputs, producer.plugin)
    except ValueError as e:
        loader.error(where, str(e))
        return None
    if outputs[output] not in types:
        loader.error(where, f"type mismatch: {ref.node}.{output} is a {outputs[output]!r}, "
                     f"but this input takes {' or '.join(repr(t) for t in types)}")
        return None
    return Ref(ref.node, output)


def order(loader: MarkedYAML, nodes: dict[str, Node]) -> list[str]:
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
