"""The adapter config type: what a LoRA / QLoRA adapter artifact records about
itself in ``adapter_config.json``. Pure Python (no torch), so params models can
take their defaults from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gptflow.ml.prompts import PromptFormat

DEFAULT_TARGETS = ("*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj")
ADAPTER_FORMAT = "gptflow-lora"
ADAPTER_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LoraConfig:
    """An adapter's recipe, saved as ``adapter_config.json``: enough to rebuild the
    adapted model on the very base it was trained on."""

    base_path: str  # the base model artifact's folder
    base_fingerprint: str  # ... and its fingerprint, checked on load
    rank: int = 8  # B (out, r) @ A (r, in)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    layers: tuple[str, ...] = DEFAULT_TARGETS  # name patterns; once applied, exact names
    also_train: tuple[str, ...] = ()  # trained in full, saved with the adapter
    # the frozen base in 4 bits (QLoRA): NF4, or int4 (GGUF's own grid, at GGUF_BLOCK)
    quantize_base: Literal["none", "nf4", "int4"] = "none"
    nf4_block: int = 64
    double_quant: bool = True  # the NF4 block scales quantized to int8 too
    # with a 4-bit base, the token embedding (and a head tied to it) in int4 too: on
    # a 150k-token vocabulary it is a quarter of a 0.5B model's weights
    quantize_embeddings: bool = False
    prompt: PromptFormat = field(default_factory=PromptFormat)

    def to_dict(self) -> dict[str, Any]:
        return {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
                **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Read a saved config; raises ValueError naming what does not fit."""
        if data.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"not a gptflow adapter (format {data.get('format')!r})")
        if data.get("format_version") != ADAPTER_FORMAT_VERSION:
            raise ValueError(f"adapter format_version {data.get('format_version')!r} is not "
                             f"{ADAPTER_FORMAT_VERSION}")
        fields = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown adapter field(s): {', '.join(sorted(unknown))}")
        return cls(**{**fields, "layers": tuple(fields.get("layers", DEFAULT_TARGETS)),
                      "also_train": tuple(fields.get("also_train", ())),
                      "prompt": PromptFormat.of(fields)})
