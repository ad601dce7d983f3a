"""Hugging Face folders in and out.

Reading and writing are plain files (``config.json``, safetensors, the legacy
``pytorch_model.bin`` read with ``weights_only``, ``tokenizer.json``):
``transformers`` is never imported here. Each family is one record in
:mod:`gptflow.ml.families` (its switches, its config.json fields, its weight
map); both directions walk that record's weight map.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from gptflow.ml.adapter import LoraConfig
from gptflow.ml.config import GPTConfig
from gptflow.ml.families import Family, HFError, family_of, read_family
from gptflow.ml.model import GPT, claimed_layers, state_shapes
from gptflow.ml.tokenizer import EOT, PAD, Tokenizer


def config_to_hf(config: GPTConfig, family: Family, tokenizer: Tokenizer) -> dict[str, Any]:
    return {"architectures": [family.architecture], "model_type": family.name,
            **family.write_config(config),
            "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
            "pad_token_id": tokenizer.pad_id, "torch_dtype": "float32",
            "tie_word_embeddings": config.tie_embeddings, "vocab_size": config.vocab_size}


# -- weights ------------------------------------------------------------------------
def read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face folder: safetensors (sharded or not), else the
    legacy pickle read with ``weights_only`` (no code runs)."""
    index = next((folder / n for n in ("model.safetensors.index.json",
                                       "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        outside = [f for f in files if Path(f).name != f]
        if outside:  # the folder is what is fingerprinted and verified: nothing else is read
            raise HFError(f"{index}: weight_map names files outside the model folder "
                          f"({', '.join(outside[:3])})")
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
            try:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
            except pickle.UnpicklingError:  # torch's own text advises turning the check off
                raise HFError(f"{path}: refused: the pickle holds Python objects besides "
                              "tensors, and gptflow runs no code from a model file "
                              "(convert it to safetensors)") from None
    return state


IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights


def from_hf(theirs: dict[str, Tensor], config: GPTConfig, family: Family, where: str
            ) -> dict[str, Tensor]:
    """gptflow's state dict from a Hugging Face one; names what is missing or extra."""
    prefix = family.checkpoint_prefix  # e.g. GPT2Model checkpoints (the original ones)
    if prefix:
        theirs = {k if k.startswith((prefix, "lm_head.")) else f"{prefix}{k}": v
                  for k, v in theirs.items()}
    theirs = {k: v for k, v in theirs.items() if not k.endswith(IGNORED)}
    if config.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    problem = claimed_layers(config, theirs, "config.json")
    if problem:
        raise HFError(f"{where}: weights do not match config.json: {problem}")
    shapes = state_shapes(config)
    rows = family.weight_map(config)
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
    bad = [k for k, t in ours.items() if tuple(t.shape) != shapes[k]]
    if bad:
        raise HFError(f"{where}: {bad[0]} has shape {tuple(ours[bad[0]].shape)}, config.json "
                      f"implies {tuple(shapes[bad[0]])}")
    return ours


def to_hf(ours: dict[str, Tensor], config: GPTConfig, family: Family) -> dict[str, Tensor]:
    """The Hugging Face state dict of a gptflow one; GPT-2's biases that a
    bias-free gptflow model lacks are written as zeros (the same function)."""
    out: dict[str, Tensor] = {}
    for row in family.weight_map(config):
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
    """``tokenizer.json`` and a ``tokenizer_config.json`` that AutoTokenizer reads
    (the chat template, BOS and EOS travel with it)."""
    tokenizer.save(folder / "tokenizer.json")
    eot = tokenizer.hf.id_to_token(tokenizer.eot_id)
    pad = tokenizer.hf.id_to_token(tokenizer.pad_id)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
        "bos_token": eot, "eos_token": eot, "pad_token": pad or PAD,
        "add_bos_token": False, "clean_up_tokenization_spaces": False,
        **tokenizer.config.to_hf()}, indent=2))


# -- whole folders ------------------------------------------------------------------
def is_hf_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def import_hf(source: Path) -> tuple[GPTConfig, dict[str, Tensor], Tokenizer, str]:
    """Read a Hugging Face folder: its config, its weights as gptflow names them
    (in their stored dtype), its tokenizer and its family."""
    where = f"{source}/config.json"
    config, family = read_family(json.loads((source / "config.json").read_text()), where)
    state = from_hf(read_tensors(source), config, family, where)
    return config, state, read_tokenizer(source), family.name


def export_peft(model: GPT, tokenizer: Tokenizer, adapter: LoraConfig, folder: Path) -> bool:
    """Write a LoRA-adapted Llama-family model as a PEFT adapter (``adapter_config.json``
    + ``adapter_model.safetensors``) with its base as a Hugging Face folder in
    ``folder/base``. Returns False, writing nothing, where PEFT's layout cannot
    hold it exactly: GPT-2 fuses q/k/v into one ``c_attn``, and parameters trained
    in full (``also_train``) have no LoRA form. The base must be full precision
    (a QLoRA base dequantized: what the adapter was trained on)."""
    from copy import deepcopy

    from gptflow.ml.lora import LoRALinear

    family = family_of(model.config)
    if not family.peft_exact or adapter.also_train:
        return False
    names = {r.ours[0].removesuffix(".weight"): r.theirs.removesuffix(".weight")
             for r in family.weight_map(model.config)}
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
    return GPT.from_state_dict(config, state).eval(), tokenizer


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
    return family.name
