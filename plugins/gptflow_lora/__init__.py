"""lora: parameter-efficient instruction tuning; with ``quantize_base: nf4``, QLoRA.

The base model is frozen (and, for QLoRA, stored in 4-bit NF4 and dequantized on
the fly); low-rank adapters on the chosen linear layers are the only weights in
the optimizer. The output is an adapter: its weights, its config and the
fingerprint of the base it belongs to (a few KB to MB).

YAML keys (``params``): everything ``instruction-finetune`` takes (``tasks``,
``k_examples``, ``template``, ``max_per_task``, ``max_len``, ``trainer``,
``optim``, ``batch_size``, ``seed``), plus

* ``rank``, ``alpha``, ``dropout``: the adapters (update scale alpha / rank);
* ``layers``: name patterns of the layers to adapt (``*.q_proj``, ``*.up_proj``, ...);
* ``also_train``: parameters trained in full and saved with the adapter (peft's
  ``modules_to_save``), e.g. ``embed.weight``;
* ``quantize_base``: ``none`` or ``nf4``; ``nf4_block``, ``double_quant``.

Inputs: ``model``; optional ``data`` datasets. Output: ``adapter``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gptflow import Context, NodeType, hookimpl
from gptflow.params import TUNING_INPUTS, InstructionParams


class LoraParams(InstructionParams):
    rank: int = Field(8, ge=1)
    """Rank r of each adapter: B (out, r) @ A (r, in)."""
    alpha: float = Field(16.0, gt=0)
    """Scale of the adapter update: alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""
    layers: list[str] = Field(default_factory=lambda: ["*.q_proj", "*.k_proj", "*.v_proj",
                                                       "*.o_proj"])
    """Name patterns of linear layers to adapt (attention: *_proj of attn; MLP: *.up_proj...)."""
    also_train: list[str] = Field(default_factory=list)
    """Parameter names (patterns) trained in full and saved with the adapter, as peft's
    modules_to_save; e.g. embed.weight when new output tokens must be learned."""
    quantize_base: Literal["none", "nf4"] = "none"
    """nf4: keep the frozen base in 4-bit NormalFloat (QLoRA)."""
    nf4_block: int = Field(64, ge=16)
    """Weights per NF4 absmax block."""
    double_quant: bool = True
    """Quantize the NF4 block scales to int8 as well."""


def run(context: Context, inputs: dict[str, Any], p: LoraParams) -> dict[str, Any]:
    from gptflow.ml.checkpoint import adapt, load_model, save_adapter
    from gptflow.ml.tuning import finish, prompt_info, tune

    base = inputs["model"]
    model, tokenizer = load_model(base.path)
    config = {"base_path": str(base.path), "base_fingerprint": base.fingerprint,
              "rank": p.rank, "alpha": p.alpha, "dropout": p.dropout, "layers": p.layers,
              "also_train": p.also_train,
              "quantize_base": p.quantize_base, "nf4_block": p.nf4_block,
              "double_quant": p.double_quant, "prompt": prompt_info(p)}
    config["layers"] = adapt(model, config)  # the exact names, for loading
    model.train()
    trainer, metrics = tune(context, model, tokenizer, p, inputs.get("data") or [])
    if trainer.is_global_zero:
        metrics["bytes_on_disk"] = save_adapter(context.output_dir("adapter"), model, config)
    finish(context, trainer, "adapter")
    metrics["base_bytes_in_memory"] = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
        if not t.requires_grad)
    return metrics


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="lora", run=run, params=LoraParams, version="1",
        inputs=TUNING_INPUTS,
        outputs={"adapter": "adapter"},
        description="LoRA / QLoRA instruction tuning: a frozen base, trained low-rank adapters."))
