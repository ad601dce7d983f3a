"""Hugging Face model families, one record each (litgpt's per-model converters):
which switches of the one GPT compute the family, how its ``config.json`` maps
onto a :class:`GPTConfig` and back, and its weight map. Adding a family is
adding one record to ``FAMILIES``.

A weight-map row names, for one Hugging Face tensor, the gptflow tensor(s) it
is: GPT-2 fuses q/k/v into ``c_attn`` (several rows joined along dim 0) and
stores its linear weights transposed (``Conv1D``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gptflow.ml.config import GPTConfig


class HFError(ValueError):
    """A Hugging Face folder gptflow cannot map; the message names the field."""


@dataclass(frozen=True)
class Row:
    ours: tuple[str, ...]  # gptflow tensors, concatenated along dim 0 when several
    theirs: str
    transposed: bool = False  # GPT-2 Conv1D keeps (in, out)


class Fields:
    """A config.json being read: every refusal names the field and the file."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def get(self, field: str, default: Any = None) -> Any:
        return self.data.get(field, default)

    def need(self, field: str) -> Any:
        if field not in self.data:
            raise self.refuse(field, "missing")
        return self.data[field]

    def refuse(self, field: str, why: str) -> HFError:
        return HFError(f"{self.where}: {field}: {why}")


@dataclass(frozen=True)
class Family:
    name: str  # config.json's model_type
    architecture: str  # config.json's architectures[0]
    computes: Callable[[GPTConfig], bool]  # whether this family computes what a config does
    read_config: Callable[[Fields], dict[str, Any]]  # -> GPTConfig fields
    write_config: Callable[[GPTConfig], dict[str, Any]]  # -> family-specific config.json keys
    rows: Callable[[GPTConfig], list[Row]]  # the weight map, head excluded
    peft_exact: bool  # its adapted layers have PEFT names (GPT-2 fuses q/k/v: no)
    checkpoint_prefix: str = ""  # prefixed to tensors saved without it (GPT2Model files)

    def weight_map(self, config: GPTConfig) -> list[Row]:
        rows = self.rows(config)
        if not config.tie_embeddings:
            rows.append(Row(("lm_head.weight",), "lm_head.weight"))
        return rows


# -- GPT-2 ---------------------------------------------------------------------------
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation we compute
GPT2_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def _plain_attention(c: GPTConfig) -> bool:
    return not (c.qkv_bias or c.qk_norm) and c.head_dim * c.n_head == c.d_model


def _gpt2_computes(c: GPTConfig) -> bool:
    return (c.position, c.norm, c.mlp) == ("learned", "layernorm", "gelu") \
        and c.kv_heads == c.n_head and _plain_attention(c)


def _gpt2_read(f: Fields) -> dict[str, Any]:
    act = f.get("activation_function", "gelu_new")
    if act not in GPT2_GELU:
        raise f.refuse("activation_function", f"{act!r} is not supported (only the tanh "
                       f"GELU: {', '.join(GPT2_GELU)})")
    for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if f.get(field):
            raise f.refuse(field, "true is not supported")
    if f.get("scale_attn_weights", True) is not True:
        raise f.refuse("scale_attn_weights", "false is not supported")
    return dict(vocab_size=f.need("vocab_size"), context=f.get("n_positions", 1024),
                n_layer=f.need("n_layer"), n_head=f.need("n_head"), d_model=f.need("n_embd"),
                d_ff=f.get("n_inner"), position="learned", norm="layernorm", mlp="gelu",
                bias=True, norm_eps=f.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=f.get("tie_word_embeddings", True))


def _gpt2_write(c: GPTConfig) -> dict[str, Any]:
    return {"n_positions": c.context, "n_embd": c.d_model, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": c.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps, **dict.fromkeys(GPT2_DROPOUTS, 0.0)}


def _gpt2_rows(c: GPTConfig) -> list[Row]:
    rows = [Row(("embed.weight",), "transformer.wte.weight"),
            Row(("pos_embed.weight",), "transformer.wpe.weight")]
    for i in range(c.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for s in ("weight", "bias"):
            conv = s == "weight"
            rows += [Row((f"{b}attn_norm.{s}",), f"{h}ln_1.{s}"),
                     Row(tuple(f"{b}attn.{x}_proj.{s}" for x in "qkv"), f"{h}attn.c_attn.{s}",
                         conv),
                     Row((f"{b}attn.o_proj.{s}",), f"{h}attn.c_proj.{s}", conv),
                     Row((f"{b}mlp_norm.{s}",), f"{h}ln_2.{s}"),
                     Row((f"{b}mlp.up_proj.{s}",), f"{h}mlp.c_fc.{s}", conv),
                     Row((f"{b}mlp.down_proj.{s}",), f"{h}mlp.c_proj.{s}", conv)]
    rows += [Row(("norm.weight",), "transformer.ln_f.weight"),
             Row(("norm.bias",), "transformer.ln_f.bias")]
    return rows


GPT2 = Family("gpt2", "GPT2LMHeadModel", _gpt2_computes, _gpt2_read, _gpt2_write, _gpt2_rows,
              peft_exact=False, checkpoint_prefix="transformer.")


# -- the Llama lineage: Llama, Mistral, Qwen2, Qwen3 -------------------------------
def _modern(c: GPTConfig) -> bool:
    """RoPE, RMSNorm, SwiGLU, and none of Gemma's switches nor a sliding window."""
    return (c.position, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu") \
        and not (c.norm_offset or c.embed_scale or c.post_norms or c.rope_local_theta) \
        and c.query_pre_attn_scalar is None and c.sliding_window is None


def _rope_fields(f: Fields) -> dict[str, Any]:
    """What every family of the Llama lineage spells alike in config.json."""
    act = f.get("hidden_act", "silu")
    if act != "silu":
        raise f.refuse("hidden_act", f"{act!r} is not supported (silu)")
    rope = dict(f.get("rope_parameters") or {})  # transformers 5 keeps theta here
    theta = rope.pop("rope_theta", f.get("rope_theta", 10000.0))
    scaling = f.get("rope_scaling") or rope
    kind_field = "rope_type" if "rope_type" in scaling else "type"
    rope_type = scaling.get(kind_field, "default")
    scaling = ({"rope_type": rope_type, **{k: v for k, v in scaling.items()
                                           if k not in ("rope_type", "type")}}
               if rope_type != "default" else None)
    heads = f.need("num_attention_heads")
    return dict(vocab_size=f.need("vocab_size"), context=f.get("max_position_embeddings", 2048),
                n_layer=f.need("num_hidden_layers"), n_head=heads,
                n_kv_head=f.get("num_key_value_heads") or heads, d_model=f.need("hidden_size"),
                d_ff=f.need("intermediate_size"), position="rope", norm="rmsnorm", mlp="swiglu",
                rope_theta=float(theta), rope_scaling=scaling,
                norm_eps=f.get("rms_norm_eps", 1e-6),
                tie_embeddings=f.get("tie_word_embeddings", False))


def _rope_write(c: GPTConfig) -> dict[str, Any]:
    return {"hidden_size": c.d_model, "intermediate_size": c.ff_dim,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.context, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "hidden_act": "silu",
            "attention_dropout": 0.0}


def _plain_head_dim(f: Fields, fields: dict[str, Any]) -> None:
    d, heads = fields["d_model"], fields["n_head"]
    if f.get("head_dim") not in (None, d // heads):
        raise f.refuse("head_dim", f"{f.get('head_dim')} differs from hidden_size / "
                       f"num_attention_heads = {d // heads}")


def _no_sliding_window(f: Fields, context: int) -> None:
    """A window narrower than the context changes what attention sees: refused
    until gptflow computes it."""
    window = f.get("sliding_window")
    enabled = f.get("use_sliding_window", window is not None)
    if enabled and window is not None and window < context:
        raise f.refuse("sliding_window", f"{window} is narrower than the context "
                       f"({context}); sliding-window attention is not supported yet")


def _rope_rows(c: GPTConfig) -> list[Row]:
    rows = [Row(("embed.weight",), "model.embed_tokens.weight")]
    suffixes = ("weight", "bias") if c.bias else ("weight",)
    qkv = ("weight", "bias") if c.bias or c.qkv_bias else ("weight",)
    for i in range(c.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        rows += [Row((f"{b}attn_norm.weight",), f"{h}input_layernorm.weight"),
                 Row((f"{b}mlp_norm.weight",), f"{h}post_attention_layernorm.weight")]
        rows += [Row((f"{b}attn.{x}_proj.{s}",), f"{h}self_attn.{x}_proj.{s}")
                 for x in "qkv" for s in qkv]
        rows += [Row((f"{b}attn.o_proj.{s}",), f"{h}self_attn.o_proj.{s}") for s in suffixes]
        if c.qk_norm:
            rows += [Row((f"{b}attn.{x}_norm.weight",), f"{h}self_attn.{x}_norm.weight")
                     for x in "qk"]
        rows += [Row((f"{b}mlp.{x}_proj.{s}",), f"{h}mlp.{x}_proj.{s}")
                 for x in ("gate", "up", "down") for s in suffixes]
    rows.append(Row(("norm.weight",), "model.norm.weight"))
    return rows


def _llama_read(f: Fields) -> dict[str, Any]:
    fields = _rope_fields(f)
    _plain_head_dim(f, fields)
    bias = bool(f.get("attention_bias", False))
    if bool(f.get("mlp_bias", False)) != bias:
        raise f.refuse("mlp_bias", "must equal attention_bias (one bias switch for all "
                       "linear layers)")
    return {**fields, "bias": bias}


def _llama_write(c: GPTConfig) -> dict[str, Any]:
    return {**_rope_write(c), "attention_bias": c.bias, "mlp_bias": c.bias}


def _mistral_read(f: Fields) -> dict[str, Any]:
    fields = _rope_fields(f)
    _plain_head_dim(f, fields)
    window = f.get("sliding_window")
    return {**fields, "sliding_window": window if window and window < fields["context"]
            else None}


def _mistral_computes(c: GPTConfig) -> bool:
    """Llama with a sliding window on every layer (without one, Llama computes it)."""
    unwindowed = replace(c, sliding_window=None)
    return c.sliding_window is not None and c.layer_types is None and LLAMA.computes(unwindowed) \
        and not c.bias


def _mistral_write(c: GPTConfig) -> dict[str, Any]:
    return {**_rope_write(c), "sliding_window": c.sliding_window}


def _qwen2_read(f: Fields) -> dict[str, Any]:
    fields = _rope_fields(f)
    _plain_head_dim(f, fields)
    _no_sliding_window(f, fields["context"])
    return {**fields, "qkv_bias": True}


def _qwen2_write(c: GPTConfig) -> dict[str, Any]:
    return {**_rope_write(c), "use_sliding_window": False}


def _qwen3_read(f: Fields) -> dict[str, Any]:
    fields = _rope_fields(f)
    _no_sliding_window(f, fields["context"])
    if f.get("attention_bias", False):
        raise f.refuse("attention_bias", "true is not supported for qwen3")
    head_dim = f.get("head_dim")
    plain = head_dim in (None, fields["d_model"] // fields["n_head"])
    return {**fields, "qk_norm": True, "head_size": None if plain else int(head_dim)}


def _qwen3_write(c: GPTConfig) -> dict[str, Any]:
    return {**_rope_write(c), "use_sliding_window": False, "attention_bias": False}


LLAMA = Family("llama", "LlamaForCausalLM",
               lambda c: _modern(c) and _plain_attention(c), _llama_read, _llama_write,
               _rope_rows, peft_exact=True)
QWEN2 = Family("qwen2", "Qwen2ForCausalLM",
               lambda c: _modern(c) and c.qkv_bias and not (c.bias or c.qk_norm)
               and c.head_dim * c.n_head == c.d_model, _qwen2_read, _qwen2_write, _rope_rows,
               peft_exact=True)
QWEN3 = Family("qwen3", "Qwen3ForCausalLM",
               lambda c: _modern(c) and c.qk_norm and not (c.bias or c.qkv_bias),
               _qwen3_read, _qwen3_write, _rope_rows, peft_exact=True)
MISTRAL = Family("mistral", "MistralForCausalLM",  # without a window, exports go to llama
                 _mistral_computes, _mistral_read, _mistral_write, _rope_rows, peft_exact=True)


# -- Gemma 3 ---------------------------------------------------------------------------
GEMMA_GELU = ("gelu_pytorch_tanh", "gelu_new")  # the tanh approximation we compute


def _gemma3_computes(c: GPTConfig) -> bool:
    return (c.position, c.norm, c.mlp, c.norm_offset) == ("rope", "rmsnorm", "geglu", 1.0) \
        and c.embed_scale and c.post_norms and c.qk_norm and not (c.bias or c.qkv_bias)


def _gemma3_read(f: Fields) -> dict[str, Any]:
    act = f.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in GEMMA_GELU:
        raise f.refuse("hidden_activation", f"{act!r} is not supported ({', '.join(GEMMA_GELU)})")
    for field in ("final_logit_softcapping", "attn_logit_softcapping"):
        if f.get(field) is not None:
            raise f.refuse(field, "soft-capping is not supported (Gemma 3 leaves it null)")
    for field in ("use_bidirectional_attention", "attention_bias"):
        if f.get(field):
            raise f.refuse(field, "true is not supported")
    rope = f.get("rope_parameters") or {}  # transformers 5: one entry per layer type
    full = dict(rope.get("full_attention") or {"rope_theta": f.get("rope_theta", 1e6),
                                                 **(f.get("rope_scaling") or {})})
    local = dict(rope.get("sliding_attention")
                 or {"rope_theta": f.get("rope_local_base_freq", 10000.0)})
    if local.get("rope_type", "default") != "default":
        raise f.refuse("rope_parameters.sliding_attention", "only default RoPE is supported "
                       "on the sliding layers")
    theta = float(full.pop("rope_theta"))
    scaling = {k: v for k, v in full.items() if k != "type"}
    heads, layers = f.need("num_attention_heads"), f.need("num_hidden_layers")
    pattern = f.get("sliding_window_pattern", 6)  # before layer_types: every 6th layer full
    layer_types = f.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(layers)]
    d_model, head_dim = f.need("hidden_size"), f.get("head_dim", 256)
    return dict(vocab_size=f.need("vocab_size"), context=f.get("max_position_embeddings", 32768),
                n_layer=layers, n_head=heads, n_kv_head=f.get("num_key_value_heads") or heads,
                d_model=d_model, d_ff=f.need("intermediate_size"), position="rope",
                norm="rmsnorm", mlp="geglu", rope_theta=theta,
                rope_scaling=scaling if scaling.get("rope_type", "default") != "default"
                else None, rope_local_theta=float(local["rope_theta"]),
                norm_eps=f.get("rms_norm_eps", 1e-6), qk_norm=True,
                head_size=None if head_dim == d_model // heads else head_dim,
                norm_offset=1.0, embed_scale=True, post_norms=True,
                query_pre_attn_scalar=f.get("query_pre_attn_scalar", head_dim),
                sliding_window=f.get("sliding_window"), layer_types=tuple(layer_types),
                tie_embeddings=f.get("tie_word_embeddings", True))


def _gemma3_write(c: GPTConfig) -> dict[str, Any]:
    full = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    return {"hidden_size": c.d_model, "intermediate_size": c.ff_dim,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.context, "rms_norm_eps": c.norm_eps,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": c.query_pre_attn_scalar or c.head_dim,
            "sliding_window": c.sliding_window,
            "layer_types": list(c.layer_types or ["sliding_attention"] * c.n_layer),
            "rope_parameters": {"full_attention": full, "sliding_attention": {
                "rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}},
            "attention_bias": False, "attention_dropout": 0.0,
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "use_bidirectional_attention": False}


def _gemma3_rows(c: GPTConfig) -> list[Row]:
    rows = [Row(("embed.weight",), "model.embed_tokens.weight")]
    norms = (("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
             ("mlp_norm", "pre_feedforward_layernorm"),
             ("mlp_post_norm", "post_feedforward_layernorm"))
    for i in range(c.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        rows += [Row((f"{b}{ours}.weight",), f"{h}{theirs}.weight") for ours, theirs in norms]
        rows += [Row((f"{b}attn.{x}_proj.weight",), f"{h}self_attn.{x}_proj.weight")
                 for x in "qkvo"]
        rows += [Row((f"{b}attn.{x}_norm.weight",), f"{h}self_attn.{x}_norm.weight")
                 for x in "qk"]
        rows += [Row((f"{b}mlp.{x}_proj.weight",), f"{h}mlp.{x}_proj.weight")
                 for x in ("gate", "up", "down")]
    rows.append(Row(("norm.weight",), "model.norm.weight"))
    return rows


GEMMA3 = Family("gemma3_text", "Gemma3ForCausalLM", _gemma3_computes, _gemma3_read,
                _gemma3_write, _gemma3_rows, peft_exact=True)

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, QWEN2, QWEN3, MISTRAL, GEMMA3)}


def family_of(config: GPTConfig) -> Family:
    """The Hugging Face family whose computation equals this config's."""
    for family in FAMILIES.values():
        if family.computes(config):
            return family
    raise HFError(f"no Hugging Face architecture computes position={config.position}, "
                  f"norm={config.norm}, mlp={config.mlp}"
                  + (f", n_kv_head={config.n_kv_head}" if config.position == "learned" else "")
                  + ": GPT-2 is learned+layernorm+gelu, Llama rope+rmsnorm+swiglu (Qwen2 with "
                    "qkv_bias, Qwen3 with qk_norm, Mistral with a sliding_window), Gemma 3 "
                    "rope+rmsnorm+geglu with its own switches")


def read_family(data: Mapping[str, Any], where: str) -> tuple[GPTConfig, Family]:
    """The family of a Hugging Face config.json and a GPTConfig computing what it says."""
    fields = Fields(data, where)
    family = FAMILIES.get(str(data.get("model_type")))
    if family is None:
        raise fields.refuse("model_type", f"{data.get('model_type')!r} is not supported "
                            f"({', '.join(FAMILIES)})")
    fields_of_config = family.read_config(fields)
    try:
        return GPTConfig(**fields_of_config), family
    except ValueError as e:  # the config's own consistency checks
        raise HFError(f"{where}: {e}") from None
