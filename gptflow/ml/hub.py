"""Hugging Face Hub models through ``huggingface_hub`` (the ``hub`` extra): only
the files a model needs, into huggingface_hub's own cache, which also serves
them offline (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

from pathlib import Path

MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt"]


def snapshot(repo: str, revision: str, cache_dir: str | None = None,
             local_files_only: bool = False) -> Path:
    """The local folder of ``repo`` at ``revision`` (downloaded where it is missing)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only,
                                  allow_patterns=MODEL_FILES))
