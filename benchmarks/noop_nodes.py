"""A no-op node type for measuring the runner itself (GPTFLOW_PLUGINS=noop_nodes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from gptflow import Context, Input, NodeType, hookimpl


class NoopParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = 0


def noop(context: Context, inputs: dict[str, Any], params: NoopParams) -> None:
    (context.output_dir("out") / "index.txt").write_text(str(params.index))


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType("noop", noop, NoopParams, {"out": "dataset"},
                      {"after": Input("dataset", optional=True, many=True)}))
