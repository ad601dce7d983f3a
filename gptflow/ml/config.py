"""The GPT configuration: one dataclass whose switches select the classic or the
modern recipe, and a registry of named presets. Pure Python (no torch), so
pipelines can be validated against it without importing torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

Position = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
MLP = Literal["gelu", "swiglu", "geglu"]
Attention = Literal["sdpa", "naive"]
QuantMethod = Literal["bf16", "int8", "int8-dynamic", "int4", "nf4"]
QUANT_METHODS: tuple[str, ...] = get_args(QuantMethod)
ROPE_SCALINGS = ("default", "linear", "llama3")
LayerType = Literal["sliding_attention", "full_attention"]  # Hugging Face's names


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # set from the tokenizer when a model is built for one
    context: int = 1024  # the longest sequence the model attends over (nanoGPT's block_size)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention: fewer K/V heads; None = n_head
    d_model: int = 768
    d_ff: int | None = None  # MLP hidden width; None = 4*d (gelu) or ~8/3*d (swiglu, same params)
    position: Position = "rope"  # learned absolute positions (GPT-2) or rotary (RoPE)
    norm: Norm = "rmsnorm"  # LayerNorm (GPT-2) or RMSNorm (Llama): no mean, no bias, cheaper
    mlp: MLP = "swiglu"  # GELU MLP (GPT-2), gated SwiGLU (Llama) or gated GeGLU-tanh (Gemma)
    attention: Attention = "sdpa"  # fused scaled_dot_product_attention (Flash kernels) or naive
    rope_theta: float = 10000.0  # RoPE base frequency
    # RoPE frequency scaling for long contexts, as Hugging Face writes it:
    # {"rope_type": "linear", "factor": F} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2 has them)
    qkv_bias: bool = False  # biases on the q, k and v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    head_size: int | None = None  # per-head width; None = d_model / n_head (Qwen3 sets it)
    # Gemma's switches: RMSNorm scales by (norm_offset + w), so its weights sit around 0
    norm_offset: float = 0.0
    embed_scale: bool = False  # token embeddings times sqrt(d_model)
    post_norms: bool = False  # an RMSNorm on the attention and MLP outputs, before the residual
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None: head size
    # sliding-window attention: a query sees at most this many latest keys, itself included
    # (Mistral: every layer; Gemma 3: the layers layer_types names sliding_attention)
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] | None = None  # per layer; None: all sliding if windowed
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: one
    dropout: float = 0.0
    tie_embeddings: bool = True  # output head reuses the token embedding: softmax(W^T h)
    init_std: float = 0.02  # residual projections get init_std / sqrt(2 * n_layer)

    def __post_init__(self) -> None:
        kv = self.kv_heads
        if self.head_size is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by "
                             f"n_head ({self.n_head})")
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size, got {self.head_dim}")
        if self.layer_types is not None and len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, n_layer is "
                             f"{self.n_layer}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {self.sliding_window}")
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", "default") not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling.rope_type {scaling['rope_type']!r} is not supported "
                             f"({', '.join(ROPE_SCALINGS)})")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer; None: it sees every earlier key."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp != "gelu":  # 2/3 of 4d keeps the parameter count of a 4d GELU MLP
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        layer_types = data.get("layer_types")  # a JSON list
        return cls(**{**data, "layer_types": tuple(layer_types) if layer_types else None})


CLASSIC: dict[str, Any] = dict(position="learned", norm="layernorm", mlp="gelu", bias=True)
MODERN: dict[str, Any] = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: well under 1M parameters
    "tiny": dict(context=64, n_layer=2, n_head=4, d_model=64, **MODERN),
    # the quickstart: trains to readable text in a couple of CPU minutes
    "nano": dict(context=128, n_layer=4, n_head=4, d_model=128, **MODERN),
    # nanoGPT's Shakespeare-char CPU config (baby GPT)
    "shakespeare-char": dict(context=64, n_layer=4, n_head=4, d_model=128, **MODERN),
    "micro": dict(context=256, n_layer=6, n_head=6, d_model=384, **MODERN),
    # GPT-2 small (124M): the classic recipe
    "gpt2-small": dict(vocab_size=50304, context=1024, n_layer=12, n_head=12, d_model=768,
                       **CLASSIC),
    # a Llama-shaped model of GPT-2-small size: RoPE, RMSNorm, SwiGLU, GQA, untied head
    "llama-160m": dict(vocab_size=32000, context=2048, n_layer=12, n_head=12, n_kv_head=4,
                       d_model=768, tie_embeddings=False, rope_theta=500000.0, **MODERN),
}


def preset_config(name: str | None, **overrides: Any) -> GPTConfig:
    """A preset with any field overridden; unknown names and fields are errors."""
    base: dict[str, Any] = {}
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        base = dict(PRESETS[name])
    return GPTConfig.from_dict({**base, **{k: v for k, v in overrides.items() if v is not None}})
