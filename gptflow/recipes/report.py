"""The one training report every training node returns: size, work done,
speed, and how that speed compares with what the hardware could do."""

from __future__ import annotations

import time
from typing import Any

import torch

from gptflow.ml.model import GPT
from gptflow.ml.quant import logical_params

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal at ~20 tokens/param

# dense bf16 peaks of common accelerators, for MFU (FLOP/s)
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
             "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}

REPORT_KEYS = ("params", "trainable_params", "steps", "tokens", "tokens_per_s",
               "padding_share", "step_ms",
               "flops", "chinchilla_tokens", "mfu", "peak_flops", "peak_source",
               "resumed_from_step", "train_peak_rss_bytes")
"""What every training node's metrics hold (train_peak_cuda_bytes too, on a GPU)."""


def peak_flops(accelerator: str, stated_tflops: float | None = None) -> tuple[float, str]:
    """The peak MFU is measured against, and where the figure comes from."""
    if stated_tflops:
        return stated_tflops * 1e12, "stated in trainer.peak_tflops"
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAKS.items():
            if key in name:
                return value, f"{name} dense bf16 datasheet"
        return 0.0, f"{name}: unknown peak"
    n = 1024  # measured: a square fp32 matmul, the best this CPU does
    own = torch.Generator().manual_seed(0)  # leaves the global RNG (training's) alone
    a, b = torch.randn(n, n, generator=own), torch.randn(n, n, generator=own)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"measured fp32 matmul, {torch.get_num_threads()} threads"


def training_report(model: GPT, steps: int, tokens: int, tokens_per_s: float,
                    padding_share: float, step_s: float, peak: tuple[float, str],
                    resumed_from_step: int, peak_memory: dict[str, int]) -> dict[str, Any]:
    """The report: ``tokens`` (real ones, not padding) trained in ``steps``
    optimizer steps in all (resumed steps included), at the measured
    ``tokens_per_s`` (training steps only)."""
    n_params = logical_params(model)
    flops, source = peak
    return {
        "params": n_params,
        "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "padding_share": padding_share,
        "step_ms": 1000 * step_s,
        "flops": 6 * n_params * tokens,
        "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * n_params,
        "mfu": tokens_per_s * model.flops_per_token() / flops if flops else 0.0,
        "peak_flops": flops,
        "peak_source": source,
        "resumed_from_step": resumed_from_step,
        **peak_memory,
    }
