"""Export a gptflow model or adapter for other tools: a Hugging Face folder
(GPT-2 or Llama layout), or a PEFT adapter with its base, whichever holds the
artifact exactly. Written to a staging folder and renamed, so a failed export
leaves nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from gptflow.ml.checkpoint import load_any
from gptflow.ml.hf import export_hf, export_peft
from gptflow.ml.lora import merge_lora
from gptflow.ml.quant import dequantize_model


def export(source: Path, target: Path) -> str:
    """Write the artifact at ``source`` into the new (or empty) folder ``target``;
    returns what was written, for the user."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        what = _write(source, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        target.rmdir()
    staging.rename(target)
    return what


def _write(source: Path, folder: Path) -> str:
    model, tokenizer, loaded = load_any(source)
    note = "; de-quantized to float32" if dequantize_model(model) else ""
    if loaded.adapter is not None and export_peft(model, tokenizer, loaded.adapter, folder):
        return "a PEFT LoRA adapter, its base in base/" + note
    merge_lora(model)
    merged = " (the adapter merged into its base)" if loaded.adapter is not None else ""
    return export_hf(model, tokenizer, folder) + merged + note
