"""The prepared GPU check runs every one of its code paths on the CPU (--dry), so it
works the first time a GPU machine is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, "gpu_check.py", "--dry", "--json", str(out)],
                         cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = {row[0]: row for row in json.loads(out.read_text())}
    assert {"gpt2_32_true", "llama_32_true", "attention kernel", "lora", "qlora",
            "generate, gptflow float32"} <= set(rows)
    assert all(row[3] in ("ran", "ok") for row in rows.values()), rows
    assert "tokens/s" in rows["gpt2_32_true"][1] and "MFU" in rows["gpt2_32_true"][2]
    assert "flash_attention" in rows["attention kernel"][1]  # what the forward dispatched
