"""lora: parameter-efficient instruction tuning; with ``quantize_base: nf4``, QLoRA.

The base model is frozen (and, for QLoRA, stored in 4 bits: quantized layer by
layer as it loads, dequantized on the fly); low-rank adapters on the chosen
linear layers are the only weights in the optimizer. With ``trainer.precision:
bf16-mixed`` the frozen base is held in bf16 (half the memory; bf16 matmul
kernels, 3x fp32's on CPUs with AMX) and the adapters in fp32. The output is an
adapter: its weights, its config and the fingerprint of the base it belongs to
(a few KB to MB).

YAML keys (``params``): everything ``instruction-finetune`` takes (``tasks``,
``k_examples``, ``template``, ``max_per_task``, ``max_len``, ``loss_weight``,
``trainer``, ``optim``, ``batch_size``, ``seed``), plus

* ``rank``, ``alpha``, ``dropout``: the adapters (update scale alpha / rank);
* ``layers``: name patterns of the layers to adapt (``*.q_proj``, ``*.up_proj``, ...);
* ``also_train``: parameters trained in full and saved with the adapter (peft's
  ``modules_to_save``), e.g. ``embed.weight``;
* ``quantize_base``: ``none``, ``nf4`` or ``int4``; ``nf4_block``, ``double_quant``;
  ``quantize_embeddings`` (the token embedding in int4 too).

Inputs: ``model``; optional ``data`` datasets. Output: ``adapter``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

from pydantic import Field, model_validator

from gptflow import Context, NodeType, hookimpl
from gptflow.ml.adapter import LoraConfig
from gptflow.recipes.params import TUNING_INPUTS, InstructionParams

DEFAULTS = LoraConfig(base_path="", base_fingerprint="")


class LoraParams(InstructionParams):
    rank: int = Field(DEFAULTS.rank, ge=1)
    """Rank r of each adapter: B (out, r) @ A (r, in)."""
    alpha: float = Field(DEFAULTS.alpha, gt=0)
    """Scale of the adapter update: alpha / rank."""
    dropout: float = Field(DEFAULTS.dropout, ge=0, lt=1)
    """Dropout on the adapter's input."""
    layers: list[str] = Field(default_factory=lambda: list(DEFAULTS.layers))
    """Name patterns of linear layers to adapt (attention: *_proj of attn; MLP: *.up_proj...)."""
    also_train: list[str] = Field(default_factory=list)
    """Parameter names (patterns) trained in full and saved with the adapter, as peft's
    modules_to_save; e.g. embed.weight when new output tokens must be learned."""
    quantize_base: Literal["none", "nf4", "int4"] = DEFAULTS.quantize_base
    """Keep the frozen base in 4 bits (QLoRA): nf4 (4-bit NormalFloat), or int4
    (asymmetric, groups of 32: GGUF's own grid, so a base read from a Q4_0 / Q4_1
    GGUF keeps its exact weights where NF4 would round them a second time)."""
    nf4_block: int = Field(DEFAULTS.nf4_block, ge=16)
    """Weights per NF4 absmax block."""
    double_quant: bool = DEFAULTS.double_quant
    """Quantize the NF4 block scales to int8 as well."""
    quantize_embeddings: bool = DEFAULTS.quantize_embeddings
    """With a 4-bit base, keep the token embedding (and a head tied to it) in int4
    too, at groups of 32: on today's 150k-token vocabularies it is a quarter of a
    0.5B model's weights, which QLoRA otherwise keeps in full precision."""

    @model_validator(mode="after")
    def _embeddings_need_a_4bit_base(self) -> LoraParams:
        if self.quantize_embeddings and self.quantize_base == "none":
            raise ValueError("quantize_embeddings needs quantize_base (nf4 or int4): "
                             "the embedding is quantized with the base")
        trained = [t for t in self.also_train if fnmatch.fnmatch("embed.weight", t)]
        if self.quantize_embeddings and trained:
            raise ValueError(f"also_train {trained[0]!r} trains the embedding that "
                             "quantize_embeddings freezes in int4")
        return self


def run(context: Context, inputs: dict[str, Any], p: LoraParams) -> dict[str, Any]:
    from gptflow.ml.checkpoint import load_adapted, save_adapter
    from gptflow.recipes.training import loss_curve, seed
    from gptflow.recipes.tuning import tune

    base = inputs["model"]
    seed(p.seed)  # the adapters' initial weights depend on the seed alone
    model, tokenizer, config = load_adapted(base.path, LoraConfig(
        str(base.path), base.fingerprint, p.rank, p.alpha, p.dropout, tuple(p.layers),
        tuple(p.also_train), p.quantize_base, p.nf4_block, p.double_quant,
        p.quantize_embeddings, p.prompt()))
    model.train()
    fitted = tune(context, model, tokenizer, p, inputs.get("data") or [])
    metrics = fitted.metrics
    if fitted.trainer.is_global_zero:
        out = context.output_dir("adapter")
        metrics["bytes_on_disk"] = save_adapter(out, model, config)
        loss_curve(context, out / "loss.png")
    metrics["base_bytes_in_memory"] = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
        if not t.requires_grad)
    return metrics


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="lora", run=run, params=LoraParams, version="2",
        inputs=TUNING_INPUTS,
        outputs={"adapter": "adapter"},
        headline=("val_loss", "tokens_per_s", "trainable_share", "train_state_bytes"),
        description="LoRA / QLoRA instruction tuning: a frozen base, trained low-rank adapters."))
