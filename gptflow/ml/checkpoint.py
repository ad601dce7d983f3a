"""Model artifacts: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

No pickle. Loading checks every tensor against the shapes the config implies
and names what does not match.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gptflow.ml.adapter import LoraConfig
from gptflow.ml.config import GPTConfig
from gptflow.ml.inference import DecodeLinear, for_inference
from gptflow.ml.lora import adapter_state_dict, base_layer, load_adapter, merge_lora, prepare
from gptflow.ml.model import GPT, claimed_layers, shape_problems
from gptflow.ml.prompts import PromptFormat
from gptflow.ml.quant import correct_low_rank, dequantize_model, quantize_model
from gptflow.ml.tokenizer import Tokenizer

FORMAT = "gptflow-gpt"


class ModelLoadError(ValueError):
    """A model folder that does not match its own config."""


class NonFiniteWeights(ValueError):
    """A model whose weights hold NaN or inf (training diverged): never saved."""


def check_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise NonFiniteWeights(f"{len(bad)} of {len(state)} tensors hold NaN or inf "
                               f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): "
                               "training diverged; nothing is saved")


def save_model(folder: Path, model: GPT, tokenizer: Tokenizer, **info: Any) -> int:
    """Write a self-contained model artifact; returns its size in bytes."""
    if any(isinstance(m, DecodeLinear) for m in model.modules()):
        raise ValueError("a model in its inference form (for_inference: transposed "
                         "layers) does not save as an artifact; save it before")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": 1, **model.config.to_dict(), **info}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k.startswith("lm_head."))}
    check_finite(state)
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


def load_model(folder: str | Path, device: str | torch.device = "cpu",
               linear: Callable[[nn.Linear], nn.Module] | None = None) -> tuple[GPT, Tokenizer]:
    """A model artifact; ``linear`` converts each full-precision linear layer as it
    is read (see :meth:`GPT.from_state_dict`: QLoRA's base is quantized layer by layer)."""
    folder = Path(folder)
    config, data = read_config(folder)
    quant = data.get("quantization")
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    problem = claimed_layers(config, found, "config.json")
    if problem:
        raise ModelLoadError(f"{path} does not match config.json: {problem}")
    with torch.device("meta"):
        model = GPT(config)
        if quant:
            quantized_layers(model, quant)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (config.tie_embeddings and k.startswith("lm_head."))}
    problem = shape_problems(expected, found, "config.json")
    if problem:
        raise ModelLoadError(f"{path} does not match config.json: {problem}")
    tensors = ((k, t.to(device)) for k, t in read_one_by_one(path))
    if quant:  # quantized layers are built from a full-precision model first
        model = quantized_layers(GPT(config), quant).to(device)
        model.load_state_dict(dict(tensors), strict=not config.tie_embeddings)
    else:  # no initialisation, no second copy: the model takes the tensors read
        model = GPT.from_state_dict(config, tensors, linear)
    return model.eval(), Tokenizer.load(folder / "tokenizer.json")


def quantized_layers(model: GPT, quant: dict[str, Any]) -> GPT:
    """``model`` with the quantized layers a config's ``quantization`` names, their
    weights still to be loaded."""
    quantize_model(model, quant["method"], quant["group_size"], quant.get("embeddings", False))
    if quant.get("correction_rank"):
        correct_low_rank(model, quant["correction_rank"])
    return model


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_one_by_one(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A safetensors file's tensors in file order, each read into memory of its own.
    Not memory-mapped on purpose: a map stays resident for as long as any tensor
    of it lives, so a loader that converts each tensor and drops it (QLoRA) would
    still hold the whole file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            f.seek(8 + size + begin)
            if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy().data) != end - begin:
                raise ModelLoadError(f"{path}: {key} is cut short (the file is truncated)")
            yield key, tensor


def save_adapter(folder: Path, model: GPT, config: LoraConfig) -> int:
    """Write an adapter artifact: adapter weights only, plus its config (how to
    rebuild them on their base, which it names by folder and fingerprint)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    state = adapter_state_dict(model)
    check_finite(state)
    save_file(state, str(folder / "adapter.safetensors"), metadata={"format": "pt"})
    return folder_bytes(folder)


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_any` read besides the model and tokenizer."""

    config: dict[str, Any]  # the artifact's config.json (empty for a Hugging Face folder)
    adapter: LoraConfig | None = None  # when the folder is an adapter
    prompt: PromptFormat = field(default_factory=PromptFormat)  # how it was tuned


def load_any(folder: str | Path, device: str = "cpu", inference: bool = False
             ) -> tuple[GPT, Tokenizer, Loaded]:
    """A model artifact, an adapter artifact applied to its base (which must be
    the very artifact it was trained on), a Hugging Face folder or a GGUF file.
    Returns the model, its tokenizer and the artifact's config; with ``inference``,
    in the form inference runs (:func:`~gptflow.ml.inference.for_inference`)."""
    model, tokenizer, loaded = _load_any(Path(folder), device)
    return (for_inference(model) if inference else model), tokenizer, loaded


def _load_any(folder: Path, device: str) -> tuple[GPT, Tokenizer, Loaded]:
    from gptflow.ml.gguf_io import is_gguf, load_gguf
    from gptflow.ml.hf import is_hf_folder, load_hf

    if is_gguf(folder):
        model, tokenizer = load_gguf(folder)
        return model.to(device), tokenizer, Loaded({})
    if folder.is_file():
        raise ModelLoadError(f"{folder}: a file that is not GGUF (it does not begin with "
                             "GGUF's magic bytes); a model is a GGUF file or a folder")
    if is_hf_folder(folder):
        model, tokenizer = load_hf(folder)
        return model.to(device), tokenizer, Loaded({})
    if not (folder / "adapter_config.json").is_file():
        model, tokenizer = load_model(folder, device)
        config = read_config(folder)[1]
        return model, tokenizer, Loaded(config, prompt=PromptFormat.of(config))
    try:
        adapter = LoraConfig.from_dict(json.loads((folder / "adapter_config.json").read_text()))
    except ValueError as e:
        raise ModelLoadError(f"{folder}/adapter_config.json: {e}") from None
    base = Path(adapter.base_path)
    found = json.loads((base / "artifact.json").read_text()).get("fingerprint") \
        if (base / "artifact.json").is_file() else None
    if found != adapter.base_fingerprint:
        raise ModelLoadError(f"{folder}: this adapter was trained on base "
                             f"{adapter.base_fingerprint}, but {base} is "
                             f"{found or 'not a stored artifact'}")
    model, tokenizer, _ = load_adapted(base, adapter, device)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / "adapter.safetensors"), framework="pt", device=device) as f:
        for key in f.keys():  # noqa: SIM118
            state[key] = f.get_tensor(key)
    load_adapter(model, state)
    model.eval()
    return model, tokenizer, Loaded(read_config(base)[1], adapter, adapter.prompt)


def load_adapted(base: str | Path, adapter: LoraConfig, device: str = "cpu"
                 ) -> tuple[GPT, Tokenizer, LoraConfig]:
    """A base artifact with the (fresh) adapters ``adapter`` describes on it; a QLoRA
    base is quantized as it loads, so no full-precision copy of it ever exists.
    Returns the config with the adapted layers' exact names."""
    model, tokenizer = load_model(base, device, base_layer(adapter))
    return model, tokenizer, prepare(model, adapter)


def load_plain(folder: str | Path) -> tuple[GPT, Tokenizer, Loaded]:
    """Any model or adapter artifact as a plain full-precision GPT: quantized layers
    dequantized, adapters merged into their (dequantized) base."""
    model, tokenizer, loaded = load_any(folder)
    dequantize_model(model)
    merge_lora(model)
    return model, tokenizer, loaded
