"""The modern GPT recipe vs the classic one, measured: pipelines/shakespeare-char.yaml
(nanoGPT's small CPU config, 2000 steps) on the real tinyshakespeare, validation
loss over the whole held-out 10%. Writes the "Shakespeare-char" section of RESULTS.md.

    python benchmarks/shakespeare_char.py [--store DIR] [--set vars.data=PATH]

With ``--store`` a previous run of the same pipeline is reused from the cache.
"""

from __future__ import annotations

from results import run_shipped, table, write_section

TARGETS = {"modern": 1.66, "classic": 1.95}


def main() -> None:
    record, _ = run_shipped("shakespeare-char", [])  # data:tinyshakespeare
    switches = {"modern": "RoPE, RMSNorm, SwiGLU, QK-norm, sdpa",
                "classic": "learned, LayerNorm, GELU, sdpa"}
    rows = []
    for name, target in TARGETS.items():
        m = record["nodes"][name]["metrics"]
        rows.append([name, switches[name], f"{m['params']:,}", f"{m['val_loss']:.3f}",
                     f"<= {target}", f"{m['train_loss']:.3f}", f"{m['step_ms']:.1f}",
                     f"{m['tokens_per_s']:,.0f}"])
    write_section("Shakespeare-char: modern vs classic", "python benchmarks/shakespeare_char.py",
                  "4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 steps, AdamW lr 1e-3 "
                  "(100 warmup, cosine to 1e-4), beta2 0.99, wd 0.1, clip 1.0, no dropout; "
                  "val_loss over the whole last 10% of the text. Run "
                  f"{record['run_id']} (statuses: modern {record['nodes']['modern']['status']}, "
                  f"classic {record['nodes']['classic']['status']}).",
                  table(["recipe", "switches", "params", "val_loss", "target", "train_loss",
                         "ms/step", "tokens/s"], rows))


if __name__ == "__main__":
    main()
