"""Drawing a pipeline's DAG: an indented text list, Mermaid, or Graphviz dot."""

from __future__ import annotations

from gptflow.dag import Pipeline


def draw_graph(pipeline: Pipeline, fmt: str) -> str:
    edges = [(r.node, node.name, f"{r.output}->{slot}")
             for node in pipeline.nodes.values() for slot, refs in node.inputs.items()
             for r in refs]
    if fmt == "mermaid":
        lines = ["graph TD"]
        lines += [f'  {n.name}["{n.name}<br/>({n.plugin})"]' for n in pipeline.nodes.values()]
        lines += [f"  {a} -->|{label}| {b}" for a, b, label in edges]
    elif fmt == "dot":
        lines = [f'digraph "{pipeline.name}" {{', "  rankdir=LR;"]
        lines += [f'  "{n.name}" [label="{n.name}\\n({n.plugin})", shape=box];'
                  for n in pipeline.nodes.values()]
        lines += [f'  "{a}" -> "{b}" [label="{label}"];' for a, b, label in edges]
        lines.append("}")
    else:
        lines = [f"{pipeline.name}"]
        for node in pipeline.nodes.values():
            ups = ", ".join(f"{r}" for refs in node.inputs.values() for r in refs)
            lines.append(f"  {node.name} ({node.plugin})" + (f" <- {ups}" if ups else ""))
    return "\n".join(lines)
