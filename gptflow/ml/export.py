"""Export a gptflow model or adapter for other tools: a Hugging Face folder (the
family's layout), or a PEFT adapter with its base, whichever holds the artifact
exactly; or a GGUF file. Written to a staging path and renamed, so a failed
export leaves nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from gptflow.ml.checkpoint import load_any
from gptflow.ml.hf import export_hf, export_peft
from gptflow.ml.lora import merge_lora
from gptflow.ml.quant import dequantize_model


def export(source: Path, target: Path, fmt: str = "hf", gguf_type: str | None = None) -> str:
    """Write the artifact at ``source`` as ``fmt``: ``hf`` into the new (or empty)
    folder ``target``, ``gguf`` as the file ``target``. Returns what was written,
    for the user."""
    staging = target.with_name(f".{target.name}.partial")
    _remove(staging)
    if fmt == "hf":
        staging.mkdir(parents=True)
    try:
        what = (_write(source, staging) if fmt == "hf"
                else _write_gguf(source, staging, gguf_type))
    except BaseException:
        _remove(staging)
        raise
    if target.is_dir():
        target.rmdir()
    staging.rename(target)
    return what


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_gguf(source: Path, path: Path, kind: str | None) -> str:
    """A GGUF file of a plain, quantized (de-quantized first) or adapted (merged)
    model; gptflow's int8 maps to Q8_0, int4 and NF4 to Q4_0, the rest to F16."""
    from gptflow.ml.gguf_io import write_gguf

    model, tokenizer, loaded = load_any(source)
    method = (loaded.config.get("quantization") or {}).get("method")
    if loaded.adapter is not None and loaded.adapter.quantize_base != "none":
        method = loaded.adapter.quantize_base
    nearest = {"int8": "q8_0", "int8-dynamic": "q8_0", "int4": "q4_0", "nf4": "q4_0"}
    kind = kind or nearest.get(str(method), "f16")
    dequantize_model(model)
    merge_lora(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(model, tokenizer, path, kind)
    notes = [f"{method} de-quantized, written as the nearest GGUF type"] if method else []
    notes += ["the adapter merged into its base"] if loaded.adapter is not None else []
    return f"a GGUF file, {kind.upper()}" + "".join(f"; {n}" for n in notes)


def _write(source: Path, folder: Path) -> str:
    model, tokenizer, loaded = load_any(source)
    note = "; de-quantized to float32" if dequantize_model(model) else ""
    if loaded.adapter is not None and export_peft(model, tokenizer, loaded.adapter, folder):
        return "a PEFT LoRA adapter, its base in base/" + note
    merge_lora(model)
    merged = " (the adapter merged into its base)" if loaded.adapter is not None else ""
    return export_hf(model, tokenizer, folder) + merged + note
