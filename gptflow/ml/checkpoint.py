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
             if not (model.config.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(folder / "tokenizer.json")
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def read_config(folder: Path) -> tuple[GPTConfig, dict[str, Any]]:
    data = json.loads((folder / "config.json").read_text())
    if data.get("format") != FORMAT:
        raise ModelLoadError(f"{folder}/config.json: not a gptflow model (format "
                             f"{data.get('format')!r})")
    fields = set(GPTConfig.__dataclass_fields__)
    return GPTConfig.from_dict({k: v for k, v in data.items() if k in fields}), data


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    folder = Path(folder)
    config, _ = read_config(folder)
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (config.tie_embeddings and k == "lm_head.weight")}
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
    model = GPT(config).to(device)
    model.load_state_dict(state, strict=not config.tie_embeddings)
    model.eval()
    return model, Tokenizer.load(folder / "tokenizer.json")
