"""Model artifacts: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

No pickle. Loading checks every tensor against the shapes the config implies
and names what does not match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptflow.ml.config import GPTConfig
from gptflow.ml.model import GPT
from gptflow.ml.quant import quantize_model
from gptflow.ml.tokenizer import Tokenizer

FORMAT = "gptflow-gpt"


class ModelLoadError(ValueError):
    """A model folder that does not match its own config."""


def save_model(folder: Path, model: GPT, tokenizer: Tokenizer, **info: Any) -> int:
    """Write a self-contained model artifact; returns its size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": 1, **model.config.to_dict(), **info}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k.startswith("lm_head."))}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(folder / "tokenizer.json")
    return folder_bytes(folder)


def folder_bytes(folder: Path) -> int:
    """Bytes of an artifact's own files (its artifact.json record not counted)."""
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and f.name != "artifact.json")


def read_config(folder: Path) -> tuple[GPTConfig, dict[str, Any]]:
    data = json.loads((folder / "config.json").read_text())
    if data.get("format") != FORMAT:
        raise ModelLoadError(f"{folder}/config.json: not a gptflow model (format "
                             f"{data.get('format')!r})")
    fields = set(GPTConfig.__dataclass_fields__)
    return GPTConfig.from_dict({k: v for k, v in data.items() if k in fields}), data


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    folder = Path(folder)
    config, data = read_config(folder)
    quant = data.get("quantization")
    with torch.device("meta"):
        model = GPT(config)
        if quant:
            quantize_model(model, quant["method"], quant["group_size"],
                           quant.get("embeddings", False))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (config.tie_embeddings and k.startswith("lm_head."))}
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt", device=str(device)) as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            state[key] = f.get_tensor(key)
    problems = [f"missing tensor {k}" for k in expected if k not in state]
    problems += [f"unexpected tensor {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, config.json implies {shape}"
                 for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    if problems:
        raise ModelLoadError(f"{folder}/model.safetensors does not match config.json: "
                             + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    model = GPT(config)
    if quant:
        quantize_model(model, quant["method"], quant["group_size"],
                       quant.get("embeddings", False))
    model = model.to(device)
    model.load_state_dict(state, strict=not config.tie_embeddings)
    model.eval()
    return model, Tokenizer.load(folder / "tokenizer.json")


ADAPTER_FORMAT = "gptflow-lora"


def save_adapter(folder: Path, model: GPT, info: dict[str, Any]) -> int:
    """Write an adapter artifact: adapter weights only, plus how to rebuild them
    on their base (which ``info`` names by folder and fingerprint)."""
    from gptflow.ml.lora import adapter_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"format": ADAPTER_FORMAT, "format_version": 1, **info}, indent=2))
    save_file(adapter_state_dict(model), str(folder / "adapter.safetensors"),
              metadata={"format": "pt"})
    return folder_bytes(folder)


def adapt(model: GPT, config: dict[str, Any]) -> list[str]:
    """Prepare a base model as an adapter config says (NF4 base, LoRA layers);
    returns the names of the adapted layers."""
    from gptflow.ml.lora import apply_lora
    from gptflow.ml.quant import quantize_linears_nf4

    if config.get("quantize_base") == "nf4":
        quantize_linears_nf4(model, config["nf4_block"], config["double_quant"])
    return apply_lora(model, config["layers"], config["rank"], config["alpha"],
                      config["dropout"], config.get("also_train", ()))


def load_any(folder: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A model artifact, an adapter artifact applied to its base (which must be
    the very artifact it was trained on), or a Hugging Face folder. Returns the
    model, its tokenizer and the artifact's config."""
    from gptflow.ml.hf import is_hf_folder, load_hf
    from gptflow.ml.lora import load_adapter

    folder = Path(folder)
    if is_hf_folder(folder):
        model, tokenizer = load_hf(folder)
        return model.to(device), tokenizer, {}
    if not (folder / "adapter_config.json").is_file():
        model, tokenizer = load_model(folder, device)
        return model, tokenizer, read_config(folder)[1]
    config = json.loads((folder / "adapter_config.json").read_text())
    base = Path(config["base_path"])
    found = json.loads((base / "artifact.json").read_text()).get("fingerprint") \
        if (base / "artifact.json").is_file() else None
    if found != config["base_fingerprint"]:
        raise ModelLoadError(f"{folder}: this adapter was trained on base "
                             f"{config['base_fingerprint']}, but {base} is "
                             f"{found or 'not a stored artifact'}")
    model, tokenizer = load_model(base, device)
    adapt(model, config)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / "adapter.safetensors"), framework="pt", device=device) as f:
        for key in f.keys():  # noqa: SIM118
            state[key] = f.get_tensor(key)
    load_adapter(model, state)
    model.eval()
    return model, tokenizer, config


def load_plain(folder: str | Path) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Any model or adapter artifact as a plain full-precision GPT: quantized layers
    dequantized, adapters merged into their (dequantized) base."""
    from gptflow.ml.lora import merge_lora
    from gptflow.ml.quant import dequantize_model

    model, tokenizer, config = load_any(folder)
    dequantize_model(model)
    merge_lora(model)
    return model, tokenizer, config
