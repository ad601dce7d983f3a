"""Precision vs size and speed: fp32, bf16, int8, int4 and nf4 versions of one
GPT, side by side in one process.

* bytes on disk of each model artifact, and generation tokens/s at batch 1 with
  the KV cache, on a Llama-shaped model of ~58M parameters (random weights:
  speed and size do not depend on training);
* perplexity before and after quantization on a model trained here (the
  quickstart's pretraining recipe, by default 300 steps), on its validation split.

Writes the "Efficiency: precision" section of RESULTS.md.

    python benchmarks/efficiency.py [--steps 300] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from results import run_pipeline, table, write_section

from gptflow.ml.checkpoint import load_any, load_model, save_model
from gptflow.ml.config import preset_config
from gptflow.ml.data import SequentialWindows, TokenShards
from gptflow.ml.evaluation import perplexity
from gptflow.ml.generate import generate
from gptflow.ml.inference import for_inference
from gptflow.ml.model import GPT
from gptflow.ml.quant import quantize_model
from gptflow.ml.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "int8", "int8-dynamic", "int4", "nf4", "int8 + embeddings",
              "int8-dynamic + embeddings", "int4 + embeddings")


def variant(model: GPT, precision: str) -> GPT:
    """``model`` (modified in place) at a precision, as the quantize node saves it."""
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision != "fp32":
        method, _, embeddings = precision.partition(" + ")
        quantize_model(model, method, embeddings=bool(embeddings))
    return model


def tokens_per_s(model: GPT, new_tokens: int, repeats: int = 3) -> float:
    best = 0.0
    generate(model, [1, 2, 3], 4, temperature=1.0, seed=0)  # warm-up
    for r in range(repeats):
        start = time.perf_counter()
        out = generate(model, [1, 2, 3], new_tokens, temperature=1.0, seed=r)
        best = max(best, len(out) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    tokenizer = Tokenizer.train_char(["abc"])
    config = preset_config("llama-160m", n_layer=8, n_kv_head=4, context=512, vocab_size=32000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        record = run_pipeline(ROOT / "pipelines" / "quickstart.yaml",
                              [f"base.params.trainer.max_steps={args.steps}"], Path(tmp) / "s",
                              only=("tok", "base"))
        trained = Path(record["nodes"]["base"]["outputs"]["model"])
        tokens = Path(record["nodes"]["tok"]["outputs"]["tokens"])
        sizes, speeds, ppl = {}, {}, {}
        for precision in PRECISIONS:
            torch.manual_seed(0)
            folder = Path(tmp) / precision.replace(" ", "")
            method, _, embeddings = precision.partition(" + ")
            quantization = {} if precision in ("fp32", "bf16") else {"quantization": {
                "method": method, "group_size": 32, "embeddings": bool(embeddings)}}
            sizes[precision] = save_model(folder, variant(GPT(config).eval(), precision),
                                          tokenizer, **quantization)
            big = load_any(folder, inference=True)[0]  # as evaluate and generate load it
            speeds[precision] = tokens_per_s(big, args.new_tokens)
            del big
            small, _ = load_model(trained)
            small = for_inference(variant(small, precision))  # as evaluate loads it
            windows = SequentialWindows(TokenShards(tokens, "val"), small.config.context)
            ppl[precision] = perplexity(small, windows, max_batches=50)
    n = GPT(config).num_params()
    for precision in PRECISIONS:
        rows.append([precision, f"{sizes[precision] / 1e6:.1f}",
                     f"{sizes[precision] / sizes['fp32']:.3f}x", f"{speeds[precision]:.1f}",
                     f"{speeds[precision] / speeds['fp32']:.2f}x", f"{ppl[precision]:.3f}",
                     f"{ppl[precision] / ppl['fp32'] - 1:+.2%}"])
    write_section("Efficiency: precision", "python benchmarks/efficiency.py",
                  f"Size and speed: a {n / 1e6:.0f}M-parameter Llama-shaped GPT (8 layers, 768 "
                  f"wide, GQA 12/4, vocab 32000), {args.new_tokens} new tokens at batch 1, best "
                  f"of 3. Perplexity: the quickstart's nano model pretrained {args.steps} steps, "
                  "on 50 batches of its validation split. Embeddings stay full precision but in "
                  "the '+ embeddings' rows (the tied head of the small model follows them). "
                  "Targets: int8 <= 0.27x bytes and "
                  "+1% perplexity; int4 <= 0.16x bytes and +5%; quantized tokens/s >= 2x fp32.",
                  table(["precision", "MB on disk", "vs fp32", "tokens/s", "vs fp32",
                         "perplexity", "vs fp32"], rows))


if __name__ == "__main__":
    main()
