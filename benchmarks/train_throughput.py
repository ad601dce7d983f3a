"""Training and generation speed: gptflow vs a lean plain-PyTorch reference.

Both train the same model (nanoGPT's Shakespeare-char CPU config: 4 layers,
4 heads, 128 wide, context 64, batch 12) with the same AdamW, schedule and
gradient clipping on the same character tokens, in one process:

* lean: a bare loop written here (random windows, forward, backward, clip, step);
* gptflow: the ``pretrain`` node run by gptflow's runner (Lightning inside).

Tokens/s exclude the first steps (warm-up) and validation in both; the two
alternate and the best of each is kept, since this shared machine is noisy. Then
generation at batch 1: gptflow's ``generate`` (KV cache, sampling filters) vs a
lean cached decoding loop. Writes the "Training throughput" section of RESULTS.md.

    python benchmarks/train_throughput.py [--data PATH] [--steps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results import run_pipeline, table, write_section

from gptflow.fetch import fetch
from gptflow.ml.config import preset_config
from gptflow.ml.lm import lr_lambda, param_groups
from gptflow.ml.loss import token_loss
from gptflow.ml.model import GPT, KVCache
from gptflow.ml.optim import Optim

BATCH, CONTEXT, WARMUP_STEPS = 12, 64, 3


def lean_train(tokens: np.ndarray, vocab: int, steps: int, precision: str) -> float:
    """A plain PyTorch loop; returns tokens/s."""
    torch.manual_seed(1337)
    model = GPT(preset_config("shakespeare-char", vocab_size=vocab, qk_norm=True))  # as the node
    optim = Optim()
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                            betas=(optim.beta1, optim.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, steps))
    rng = np.random.default_rng(0)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    elapsed = 0.0
    for step in range(steps):
        start = time.perf_counter()
        ix = rng.integers(0, len(tokens) - CONTEXT - 1, BATCH)
        batch = torch.from_numpy(np.stack([tokens[i:i + CONTEXT + 1] for i in ix]).astype(np.int64))
        with autocast:
            loss = token_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= WARMUP_STEPS:
            elapsed += time.perf_counter() - start
    return (steps - WARMUP_STEPS) * BATCH * CONTEXT / elapsed


def gptflow_train(data: Path, steps: int, precision: str, store: Path) -> dict[str, float]:
    """The modern node of the shakespeare-char pipeline, run by gptflow."""
    record = run_pipeline(Path(__file__).parents[1] / "pipelines" / "shakespeare-char.yaml",
                          [f"vars.data={data}", f"vars.steps={steps}",
                           f"modern.params.trainer.precision={precision}"], store,
                          only=("chars", "modern"))
    return dict(record["nodes"]["modern"]["metrics"])


def lean_generate(model: GPT, prompt: list[int], n: int) -> float:
    """A bare cached decoding loop (multinomial sampling); returns tokens/s."""
    torch.manual_seed(0)
    with torch.inference_mode():
        start = time.perf_counter()
        cache = KVCache(model.config, 1, len(prompt) + n, torch.device("cpu"), torch.float32)
        logits = model(torch.tensor([prompt]), cache=cache)[:, -1]
        for i in range(n - 1):
            token = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1)
            logits = model(token, cache=cache, start=len(prompt) + i)[:, -1]
        return n / (time.perf_counter() - start)


def gptflow_generate(model: GPT, prompt: list[int], n: int) -> float:
    from gptflow.ml.generate import generate

    start = time.perf_counter()
    out = generate(model, prompt, n, temperature=0.8, top_k=None, seed=0)
    assert len(out) == n
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=None,
                        help="a text file (default: data:tinyshakespeare, fetched once)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from gptflow.ml.tokenizer import Tokenizer

    text = (args.data or fetch("data:tinyshakespeare")).read_text(encoding="utf-8")
    tokenizer = Tokenizer.train_char([text])
    tokens = tokenizer.encode_documents([text])[: int(len(text) * 0.9)].astype(np.uint16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("32-true", "bf16-mixed"):
            leans, runs = [], []
            for rep in range(args.repeats):  # alternate, keep the best: this VM is noisy
                leans.append(lean_train(tokens, tokenizer.vocab_size, args.steps, precision))
                runs.append(gptflow_train(args.data, args.steps, precision,
                                          Path(tmp) / f"{precision}-{rep}"))
            lean = max(leans)
            ours = max(runs, key=lambda m: m["tokens_per_s"])
            rows.append((f"train, {precision} (best of {args.repeats})", lean, ours["tokens_per_s"],
                         f"MFU {ours['mfu']:.1%} of {ours['peak_flops'] / 1e9:.0f} GFLOP/s "
                         f"({ours['peak_source']}); {ours['step_ms']:.1f} ms/step"))
    model = GPT(preset_config("shakespeare-char", vocab_size=tokenizer.vocab_size)).eval()
    prompt = tokenizer.encode("ROMEO:\n")
    n = CONTEXT - len(prompt)
    pairs = [(lean_generate(model, prompt, n), gptflow_generate(model, prompt, n))
             for _ in range(20)]  # interleaved: this VM's speed drifts
    lean_g, ours_g = max(p[0] for p in pairs), max(p[1] for p in pairs)
    rows.append(("generate, batch 1, fp32 (best of 20)", lean_g, ours_g,
                 f"{n} new tokens, KV cache"))
    write_section("Training throughput", "python benchmarks/train_throughput.py",
                  f"Shakespeare-char config, batch {BATCH}, context {CONTEXT}, "
                  f"{args.steps} steps each; targets: train >= 0.95x, generate >= 0.9x.",
                  table(["what", "lean reference tokens/s", "gptflow tokens/s", "ratio", "notes"],
                        [[what, f"{lean:,.0f}", f"{ours:,.0f}", f"{ours / lean:.2f}x", note]
                         for what, lean, ours, note in rows]))


if __name__ == "__main__":
    main()
