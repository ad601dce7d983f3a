"""Hugging Face folders in and out: the GPT-2 and Llama families.

Reading and writing are plain files (``config.json``, safetensors, the legacy
``pytorch_model.bin`` read with ``weights_only``, ``tokenizer.json``):
``transformers`` is never imported here. One table per family names, for each
gptflow tensor, the Hugging Face tensor it is; both directions walk that table.
GPT-2 stores its linear weights transposed (``Conv1D``) and its q/k/v fused
into ``c_attn``: a row may join several gptflow tensors and flip them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from gptflow.ml.adapter import LoraConfig
from gptflow.ml.config import GPTConfig
from gptflow.ml.model import GPT
from gptflow.ml.tokenizer import EOT, PAD, Tokenizer

FAMILIES = ("gpt2", "llama")
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation we compute
DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")


class HFError(ValueError):
    """A Hugging Face folder gptflow cannot map; the message names the field."""


@dataclass(frozen=True)
class Row:
    ours: tuple[str, ...]  # gptflow tensors, concatenated along dim 0 when several
    theirs: str
    transposed: bool = False  # GPT-2 Conv1D keeps (in, out)


def family_of(config: GPTConfig) -> str:
    """The Hugging Face architecture whose computation equals this config's."""
    if config.position == "learned" and config.norm == "layernorm" and config.mlp == "gelu" \
            and config.kv_heads == config.n_head:
        return "gpt2"
    if config.position == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu":
        return "llama"
    raise HFError(f"no Hugging Face architecture computes position={config.position}, "
                  f"norm={config.norm}, mlp={config.mlp}"
                  + (f", n_kv_head={config.n_kv_head}" if config.position == "learned" else "")
                  + ": GPT-2 is learned+layernorm+gelu, Llama rope+rmsnorm+swiglu")


def table(config: GPTConfig, family: str) -> list[Row]:
    rows: list[Row] = []
    if family == "gpt2":
        rows += [Row(("embed.weight",), "transformer.wte.weight"),
                 Row(("pos_embed.weight",), "transformer.wpe.weight")]
        for i in range(config.n_layer):
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
    else:
        rows.append(Row(("embed.weight",), "model.embed_tokens.weight"))
        suffixes = ("weight", "bias") if config.bias else ("weight",)
        for i in range(config.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            rows += [Row((f"{b}attn_norm.weight",), f"{h}input_layernorm.weight"),
                     Row((f"{b}mlp_norm.weight",), f"{h}post_attention_layernorm.weight")]
            rows += [Row((f"{b}attn.{x}_proj.{s}",), f"{h}self_attn.{x}_proj.{s}")
                     for x in "qkvo" for s in suffixes]
            rows += [Row((f"{b}mlp.{x}_proj.{s}",), f"{h}mlp.{x}_proj.{s}")
                     for x in ("gate", "up", "down") for s in suffixes]
        rows.append(Row(("norm.weight",), "model.norm.weight"))
    if not config.tie_embeddings:
        rows.append(Row(("lm_head.weight",), "lm_head.weight"))
    return rows


# -- config -------------------------------------------------------------------------
def config_from_hf(data: dict[str, Any], where: str) -> tuple[GPTConfig, str]:
    """A GPTConfig computing what a Hugging Face config.json describes."""
    kind = data.get("model_type")

    def refuse(field: str, why: str) -> HFError:
        return HFError(f"{where}: {field}: {why}")

    def need(field: str) -> Any:
        if field not in data:
            raise refuse(field, "missing")
        return data[field]

    if kind == "gpt2":
        act = data.get("activation_function", "gelu_new")
        if act not in GPT2_GELU:
            raise refuse("activation_function", f"{act!r} is not supported (only the tanh "
                         f"GELU: {', '.join(GPT2_GELU)})")
        for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if data.get(field):
                raise refuse(field, "true is not supported")
        if data.get("scale_attn_weights", True) is not True:
            raise refuse("scale_attn_weights", "false is not supported")
        try:
            config = GPTConfig(
                vocab_size=need("vocab_size"), context=data.get("n_positions", 1024),
                n_layer=need("n_layer"), n_head=need("n_head"), d_model=need("n_embd"),
                d_ff=data.get("n_inner"), position="learned", norm="layernorm", mlp="gelu",
                bias=True, norm_eps=data.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=data.get("tie_word_embeddings", True))
        except ValueError as e:
            raise HFError(f"{where}: {e}") from None
        return config, "gpt2"
    if kind == "llama":
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise refuse("hidden_act", f"{act!r} is not supported (silu)")
        d, heads = need("hidden_size"), need("num_attention_heads")
        if data.get("head_dim") not in (None, d // heads):
            raise refuse("head_dim", f"{data['head_dim']} differs from hidden_size / "
                         f"num_attention_heads = {d // heads}")
        bias = bool(data.get("attention_bias", False))
        if bool(data.get("mlp_bias", False)) != bias:
            raise refuse("mlp_bias", "must equal attention_bias (one bias switch for all "
                         "linear layers)")
        rope = dict(data.get("rope_parameters") or {})  # transformers 5 keeps theta here
        theta = rope.pop("rope_theta", data.get("rope_theta", 10000.0))
        scaling = data.get("rope_scaling") or rope
        kind_field = "rope_type" if "rope_type" in scaling else "type"
        rope_type = scaling.get(kind_field, "default")
        scaling = ({"rope_type": rope_type, **{k: v for k, v in scaling.items()
                                               if k not in ("rope_type", "type")}}
                   if rope_type != "default" else None)
        try:
            config = GPTConfig(
                vocab_size=need("vocab_size"), context=data.get("max_position_embeddings", 2048),
                n_layer=need("num_hidden_layers"), n_head=heads,
                n_kv_head=data.get("num_key_value_heads") or heads, d_model=d,
                d_ff=need("intermediate_size"), position="rope", norm="rmsnorm", mlp="swiglu",
                bias=bias, rope_theta=float(theta), rope_scaling=scaling,
                norm_eps=data.get("rms_norm_eps", 1e-6),
                tie_embeddings=data.get("tie_word_embeddings", False))
        except ValueError as e:
            raise HFError(f"{where}: {e}") from None
        return config, "llama"
    raise refuse("model_type", f"{kind!r} is not supported ({', '.join(FAMILIES)})")


def config_to_hf(config: GPTConfig, family: str, tokenizer: Tokenizer) -> dict[str, Any]:
    ids = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
           "pad_token_id": tokenizer.pad_id, "torch_dtype": "float32",
           "tie_word_embeddings": config.tie_embeddings, "vocab_size": config.vocab_size}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_positions": config.context, "n_embd": config.d_model,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
                **dict.fromkeys(DROPOUTS[:3], 0.0), **ids}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": config.d_model, "intermediate_size": config.ff_dim,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
            "max_position_embeddings": config.context, "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
            "attention_bias": config.bias, "mlp_bias": config.bias, "hidden_act": "silu",
            "attention_dropout": 0.0, **ids}


# -- weights ------------------------------------------------------------------------
def read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face folder: safetensors (sharded or not), else the
    legacy pickle read with ``weights_only`` (no code runs)."""
    index = next((folder / n for n in ("model.safetensors.index.json",
                                       "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    if not files:
        raise HFError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")
    state: dict[str, Tensor] = {}
    for name in files:
        path = folder / name
        if name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights


def from_hf(theirs: dict[str, Tensor], config: GPTConfig, family: str, where: str
            ) -> dict[str, Tensor]:
    """gptflow's state dict from a Hugging Face one; names what is missing or extra."""
    if family == "gpt2":  # GPT2Model checkpoints (the original ones) lack the prefix
        theirs = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
                  for k, v in theirs.items()}
    theirs = {k: v for k, v in theirs.items() if not k.endswith(IGNORED)}
    if config.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    rows = table(config, family)
    missing = [r.theirs for r in rows if r.theirs not in theirs]
    extra = sorted(set(theirs) - {r.theirs for r in rows})
    if missing or extra:
        raise HFError(f"{where}: weights do not match config.json: "
                      + "; ".join([f"missing {k}" for k in missing[:3]]
                                  + [f"unexpected {k}" for k in extra[:3]]))
    ours: dict[str, Tensor] = {}
    for row in rows:
        tensor = theirs[row.theirs]
        tensor = tensor.t() if row.transposed else tensor
        sizes = [shapes[k][0] for k in row.ours]
        if sum(sizes) != tensor.shape[0]:
            raise HFError(f"{where}: {row.theirs} has shape {tuple(theirs[row.theirs].shape)}, "
                          f"config.json implies {sum(sizes)} rows")
        ours.update({k: t.contiguous() for k, t in zip(row.ours, torch.split(tensor, sizes),
                                                       strict=True)})
    bad = [k for k, t in ours.items() if t.shape != shapes[k]]
    if bad:
        raise HFError(f"{where}: {bad[0]} has shape {tuple(ours[bad[0]].shape)}, config.json "
                      f"implies {tuple(shapes[bad[0]])}")
    return ours


def to_hf(ours: dict[str, Tensor], config: GPTConfig, family: str) -> dict[str, Tensor]:
    """The Hugging Face state dict of a gptflow one; GPT-2's biases that a
    bias-free gptflow model lacks are written as zeros (the same function)."""
    out: dict[str, Tensor] = {}
    for row in table(config, family):
        parts = [ours[k] if k in ours else torch.zeros(_bias_size(ours, k)) for k in row.ours]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[row.theirs] = (tensor.t() if row.transposed else tensor).contiguous()
    return out


def _bias_size(ours: dict[str, Tensor], key: str) -> int:
    return ours[key.removesuffix("bias") + "weight"].shape[0]


# -- tokenizer ----------------------------------------------------------------------
def read_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.load(folder / "tokenizer.json")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        hf = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"),
                                              str(folder / "merges.txt")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOT])
        return Tokenizer(hf)
    raise HFError(f"{folder}: no tokenizer.json (or vocab.json + merges.txt); a "
                  "sentencepiece-only folder needs converting to tokenizer.json first")


def write_tokenizer(folder: Path, tokenizer: Tokenizer, context: int) -> None:
    tokenizer.save(folder / "tokenizer.json")
    eot = tokenizer.hf.id_to_token(tokenizer.eot_id)
    pad = tokenizer.hf.id_to_token(tokenizer.pad_id)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
        "bos_token": eot, "eos_token": eot, "pad_token": pad or PAD,
        "add_bos_token": False, "clean_up_tokenization_spaces": False}, indent=2))


# -- whole folders ------------------------------------------------------------------
def is_hf_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def import_hf(source: Path) -> tuple[GPTConfig, dict[str, Tensor], Tokenizer, str]:
    """Read a Hugging Face folder: its config, its weights as gptflow names them
    (in their stored dtype), its tokenizer and its family."""
    where = f"{source}/config.json"
    config, family = config_from_hf(json.loads((source / "config.json").read_text()), where)
    state = from_hf(read_tensors(source), config, family, where)
    return config, state, read_tokenizer(source), family


def export_peft(model: GPT, tokenizer: Tokenizer, adapter: LoraConfig, folder: Path) -> bool:
    """Write a LoRA-adapted Llama-family model as a PEFT adapter (``adapter_config.json``
    + ``adapter_model.safetensors``) with its base as a Hugging Face folder in
    ``folder/base``. Returns False, writing nothing, where PEFT's layout cannot
    hold it exactly: GPT-2 fuses q/k/v into one ``c_attn``, and parameters trained
    in full (``also_train``) have no LoRA form. The base must be full precision
    (a QLoRA base dequantized: what the adapter was trained on)."""
    from copy import deepcopy

    from gptflow.ml.lora import LoRALinear

    if family_of(model.config) != "llama" or adapter.also_train:
        return False
    names = {r.ours[0].removesuffix(".weight"): r.theirs.removesuffix(".weight")
             for r in table(model.config, "llama")}
    base, state, targets = deepcopy(model), {}, []
    for name, module in list(base.named_modules()):
        if isinstance(module, LoRALinear):
            theirs = names[name]
            targets.append(theirs)
            state[f"base_model.model.{theirs}.lora_A.weight"] = module.lora_A.detach().clone()
            state[f"base_model.model.{theirs}.lora_B.weight"] = module.lora_B.detach().clone()
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.base)
    export_hf(base, tokenizer, folder / "base")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank,
        "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": str((folder / "base").resolve())},
        indent=2))
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return True


def load_hf(source: Path) -> tuple[GPT, Tokenizer]:
    """A Hugging Face folder as a gptflow GPT in its stored dtype, in eval mode."""
    config, state, tokenizer, _ = import_hf(source)
    model = GPT(config).to(state["embed.weight"].dtype)
    model.load_state_dict(state, strict=not config.tie_embeddings)
    return model.eval(), tokenizer


def export_hf(model: GPT, tokenizer: Tokenizer, folder: Path) -> str:
    """Write a plain (unquantized, unadapted) gptflow model as a Hugging Face folder
    that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load; returns its family."""
    config = model.config
    family = family_of(config)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(config_to_hf(config, family, tokenizer),
                                                   indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}, indent=2))
    save_file(to_hf(state, config, family), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer(folder, tokenizer, config.context)
    return family
