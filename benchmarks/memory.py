"""Peak resident memory of loading and tuning a 0.5B model: pipelines/memory.yaml
on a random-initialised Qwen2.5-0.5B-shaped checkpoint (bf16 safetensors, about
1 GB; the weights' values do not change memory), each node alone in a worker
process of its own, so that its peak is its own. Writes the "Memory: loading and
tuning a 0.5B model" section of RESULTS.md.

    python benchmarks/memory.py [--store DIR] [--set PATH=VALUE ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from results import ni_task, run_pipeline, shipped, table, write_section

MB = 1e6
NODES = (("base", "load-model"), ("lora", "LoRA r16, bf16-mixed (bf16 base)"),
         ("qlora-nf4", "QLoRA, NF4 base"), ("qlora-int4", "QLoRA, int4 base"),
         ("qlora-nf4-emb", "QLoRA, NF4 base, int4 embedding"),
         ("full", "full fine-tuning, bf16-true"))


def qwen25_05b_shaped(folder: Path) -> int:
    """A Hugging Face folder shaped as Qwen2.5-0.5B (24 layers, 896 wide, GQA 14/2,
    q/k/v biases, a tied 151,936-token embedding), random weights in bf16; the
    tokenizer is a small BPE of the task's text (the model's vocabulary is wider,
    as Qwen's own is). Returns the checkpoint's bytes."""
    import torch

    from gptflow.ml.config import GPTConfig
    from gptflow.ml.hf import export_hf
    from gptflow.ml.model import GPT
    from gptflow.ml.tasks import load_task_files
    from gptflow.ml.tokenizer import Tokenizer

    if not (folder / "model.safetensors").is_file():
        texts = [i.input for t in load_task_files(ni_task()) for i in t.instances]
        tokenizer = Tokenizer.train_bpe(texts, vocab_size=2000)
        config = GPTConfig(vocab_size=151936, context=32768, n_layer=24, n_head=14,
                           n_kv_head=2, d_model=896, d_ff=4864, qkv_bias=True,
                           rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True)
        torch.manual_seed(0)
        export_hf(GPT(config).to(torch.bfloat16), tokenizer, folder)
    return (folder / "model.safetensors").stat().st_size


def runtime_rss() -> int:
    """Resident bytes of a fresh worker with what every node imports, before any work."""
    code = ("import os, lightning, torch, gptflow.recipes.tuning\n"
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout)


def main() -> None:
    pipeline, store, overrides = shipped("memory")
    folder = store / "qwen2.5-0.5b-shaped"
    checkpoint = qwen25_05b_shaped(folder)
    os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))  # a lone worker: all
    runtime = runtime_rss()
    nodes: dict[tuple[str, bool], dict[str, Any]] = {}
    for recompute in (False, True):
        settings = [f"vars.model={folder}", f"vars.recompute={str(recompute).lower()}",
                    *overrides]
        for node, _ in NODES:  # jobs=2: each node in a worker of its own, one at a time
            record = run_pipeline(pipeline, settings, store, only=("base", node), jobs=2,
                                  force=(node,))  # measured, never cached
            nodes[node, recompute] = record["nodes"][node]

    def peaks(node: str, recompute: bool) -> list[str]:
        peak = nodes[node, recompute]["peak_mem_bytes"]
        lora = nodes["lora", recompute]["peak_mem_bytes"]
        return [f"{peak / MB:,.0f}", f"{(peak - runtime) / checkpoint:.2f}x",
                f"{peak / lora:.2f}x" if node != "base" else ""]

    rows = []
    for node, label in NODES:
        metrics = nodes[node, False]["metrics"]
        base = metrics.get("base_bytes_in_memory")
        rows.append([label, *peaks(node, False), *(peaks(node, True) if node != "base" else
                                                   ["", "", ""]),
                     f"{base / MB:,.0f}" if base else "",
                     f"{metrics['tokens_per_s']:.0f}" if "tokens_per_s" in metrics else ""])
    write_section(
        "Memory: loading and tuning a 0.5B model", "python benchmarks/memory.py",
        f"pipelines/memory.yaml with {', '.join(overrides) or 'its defaults'} on a "
        f"random-initialised Qwen2.5-0.5B-shaped checkpoint ({checkpoint / MB:,.0f} MB of "
        "bf16 safetensors): 3 steps at batch 2 x 128 tokens, each node alone in a worker "
        "process, peak RSS sampled every 50 ms over the node's whole run (loading, "
        "training, the final validation), without and with activation checkpointing "
        f"(trainer.activation_checkpointing). A fresh worker's runtime (torch, Lightning, "
        f"gptflow imported) is {runtime / MB:,.0f} MB of every peak; 'above runtime' is "
        "the rest, against the checkpoint's size. Tokens/s without checkpointing.",
        table(["node", "peak RSS MB", "above runtime / checkpoint", "peak / LoRA's",
               "recomputed: peak MB", "above runtime", "/ LoRA's",
               "frozen base in memory MB", "train tokens/s"], rows))


if __name__ == "__main__":
    main()
