"""merge-adapter: fold a LoRA adapter into its base, giving a plain model.

The adapter's base is loaded from the store (and must be the artifact the
adapter was trained on); an NF4 (QLoRA) base is dequantized first, so the
merged model computes exactly what the adapted one did. Parameters trained in
full (``also_train``) come along. No params.

Input: ``adapter``. Output: ``model``.
"""

from __future__ import annotations

from typing import Any

from gptflow import Context, Input, NodeType, Params, hookimpl


class MergeParams(Params):
    pass


def run(context: Context, inputs: dict[str, Any], p: MergeParams) -> dict[str, Any]:
    from gptflow.ml.checkpoint import load_plain, save_model

    model, tokenizer, loaded = load_plain(inputs["adapter"].path)
    size = save_model(context.output_dir("model"), model, tokenizer,
                      prompt=loaded.prompt.to_dict())
    return {"params": model.num_params(), "bytes_on_disk": size}


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="merge-adapter", run=run, params=MergeParams, version="1",
        inputs={"adapter": Input("adapter")}, outputs={"model": "model"},
        headline=("params", "bytes_on_disk"),
        description="Merge a LoRA/QLoRA adapter into its base: a plain model artifact."))
