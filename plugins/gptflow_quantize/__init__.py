"""quantize: a smaller model artifact: bf16, or int8, int4 or NF4 linear layers.

YAML keys (``params``):

* ``method``: ``bf16`` (every weight cast to bfloat16: half the bytes, served
  in bf16), ``int8`` (symmetric, per output channel, weight-only),
  ``int8-dynamic`` (the same stored weights; activations quantized per token at
  each call, as torchao's int8 dynamic-activation config),
  ``int4`` (group-wise, asymmetric: a scale and a low per group, two values per
  byte, GGUF's Q4_1) or ``nf4`` (4-bit NormalFloat, double-quantized scales);
* ``group_size``: input columns per int4 group, or weights per NF4 block; 32 by
  default, GGUF's block, so that a model read from a 4-bit GGUF keeps its grid.

* ``embeddings``: quantize the token embedding too (int8/int4). An untied output
  head is always quantized; a head tied to the embedding follows it, sharing
  its quantized table.
* ``correction_rank``: keep each quantized linear layer's rounding error to
  this rank, as two fp16 factors beside it (ZeroQuant-V2's low-rank
  compensation; 0, the default: none). What a fine-tune of a 4-bit model
  needs: its changes are smaller than a 4-bit step, and int4 alone rounds them
  away (docs/smollm2.md).

On CPU, int8 and int4 layers run PyTorch's packed kernels with bf16
activations, int8-dynamic int8 kernels on both sides; NF4 is dequantized once
when loaded for inference. Input: ``model``. Output: ``model`` (loadable by
``evaluate``, ``gptflow generate`` and every node).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, model_validator

from gptflow import Context, Input, NodeError, NodeType, Params, hookimpl
from gptflow.ml.config import QuantMethod


class QuantizeParams(Params):
    method: QuantMethod = "int8"
    """bf16: every weight cast to bfloat16; int8: per-channel symmetric, weight-only;
    int8-dynamic: the same weights with activations quantized per call (faster on CPU);
    int4: group-wise; nf4: QLoRA's NormalFloat."""
    group_size: int = Field(32, ge=16)
    """Input columns per int4 scale, or weights per NF4 block."""
    embeddings: bool = False
    """Quantize the token embedding too (int8/int4); a tied output head shares it."""
    correction_rank: int = Field(0, ge=0)
    """Rank of each linear layer's rounding error kept beside it in fp16 (0: none)."""

    @model_validator(mode="after")
    def _bf16_casts_everything(self) -> QuantizeParams:
        if self.method == "bf16" and (self.embeddings or self.correction_rank):
            raise ValueError("method bf16 casts every weight, the embedding included, and "
                             "has no grid to correct: drop embeddings and correction_rank")
        return self


def run(context: Context, inputs: dict[str, Any], p: QuantizeParams) -> dict[str, Any]:
    from torch import nn

    from gptflow.ml.checkpoint import folder_bytes, load_model, read_config, save_model
    from gptflow.ml.evaluation import generation_speed
    from gptflow.ml.inference import for_inference
    from gptflow.ml.quant import correct_low_rank, quantize_model

    source = inputs["model"].path
    if read_config(source)[1].get("quantization"):
        raise NodeError("the input model is already quantized")
    model, tokenizer = load_model(source)
    # as it is served: a copy in inference form (the file is not read a second time)
    before = generation_speed(for_inference(copy.deepcopy(model)), tokenizer)
    originals = {name: m.weight for name, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
    try:
        layers = quantize_model(model, p.method, p.group_size, p.embeddings)
    except ValueError as e:
        raise NodeError(f"params: {e}") from None
    if p.correction_rank:
        correct_low_rank(model, p.correction_rank, originals)
    del originals
    info = {k: v for k, v in read_config(source)[1].items() if k == "prompt"}  # kept as is
    size = save_model(context.output_dir("model"), model, tokenizer,
                      quantization={"method": p.method, "group_size": p.group_size,
                                    "embeddings": p.embeddings,
                                    "correction_rank": p.correction_rank}, **info)
    original = folder_bytes(source)
    in_memory = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"quantized_layers": layers, "bytes_on_disk": size,
            "bytes_ratio": size / original, "bytes_in_memory": in_memory,
            "gen_tokens_per_s_before": before,
            "gen_tokens_per_s": generation_speed(for_inference(model), tokenizer)}


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="quantize", run=run, params=QuantizeParams, version="1",
        inputs={"model": Input("model")}, outputs={"model": "model"},
        headline=("bytes_ratio", "gen_tokens_per_s", "gen_tokens_per_s_before"),
        description="Quantize a model: bf16, int8 (weight-only or dynamic), int4 or nf4."))
