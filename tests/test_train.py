"""tokenize -> pretrain end to end on tiny data, generation, resume, budgets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_training as pipeline


def test_tokenize_pretrain_generate(run_pipeline, corpus, capfd):
    result = run_pipeline(pipeline(corpus))
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["base"]["metrics"]
    for key in ("params", "tokens", "flops", "chinchilla_tokens", "tokens_per_s", "mfu",
                "train_loss", "val_loss", "val_ppl", "bytes_on_disk"):
        assert key in metrics, key
    assert metrics["steps"] == 20 and metrics["tokens"] == 20 * 8 * 32
    assert metrics["flops"] == 6 * metrics["params"] * metrics["tokens"]
    assert metrics["val_loss"] < 5.5  # well below uniform: ln(320) = 5.77
    model = result.output("base")
    assert {p.name for p in model.iterdir()} >= {"config.json", "model.safetensors",
                                                 "tokenizer.json", "loss.png", "artifact.json"}
    tokens = result.output("tok", "tokens")
    assert (tokens / "meta.json").is_file() and (tokens / "tokenizer.json").is_file()

    from gptflow.cli import main

    capfd.readouterr()
    assert main(["generate", str(model), "--prompt", "The movie", "--seed", "1",
                 "--max-new-tokens", "12"]) == 0
    assert capfd.readouterr().out.startswith("The movie")
    assert main(["generate", str(result.pipeline.parent), "--prompt", "x"]) == 2


def test_token_budget_sets_steps(run_pipeline, corpus):
    text = pipeline(corpus).replace("batch_size: 8", "batch_size: 8\n      tokens: 0.01x")
    result = run_pipeline(text)
    assert result.code == 0, result.out
    metrics = result.record["nodes"]["base"]["metrics"]
    assert metrics["steps"] == round(0.01 * metrics["params"] / (8 * 32))


def test_fsdp_on_cpu_is_a_validation_error(run_pipeline, corpus):
    result = run_pipeline(pipeline(corpus, strategy="fsdp", accelerator="cpu"), verb="validate")
    assert result.code == 2
    assert "param 'trainer.strategy': fsdp requires a GPU accelerator" in result.err
    assert ":11:" in result.err  # the line of `trainer:` in the file


def test_resume_after_kill_continues_from_saved_step(tmp_path, corpus):
    (tmp_path / "p.yaml").write_text(pipeline(corpus, steps=150, checkpoint_every=20))
    store = tmp_path / ".gptflow"
    cmd = [sys.executable, "-m", "gptflow.cli", "run", "p.yaml"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _checkpoint_step(store) < 40:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    record = json.loads(sorted(store.glob("runs/*/run.json"))[-1].read_text())
    metrics = record["nodes"]["base"]["metrics"]
    assert record["nodes"]["tok"]["status"] == "cached"
    assert metrics["resumed_from_step"] >= 40  # continued, not restarted
    assert metrics["steps"] == 150


def test_in_a_pipe_a_long_node_prints_progress_lines_a_log_can_show(tmp_path, corpus):
    """Not a terminal (CI, nohup, | tee): a progress line per interval with step,
    loss, pace and ETA (a 0.3 s interval standing in for 20 s)."""
    (tmp_path / "p.yaml").write_text(pipeline(corpus, steps=120))
    run = subprocess.run([sys.executable, "-m", "gptflow.cli", "run", "p.yaml"], cwd=tmp_path,
                         capture_output=True, text=True,
                         env={**os.environ, "GPTFLOW_PROGRESS_EVERY": "0.3"})
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("  base step ")]
    assert len(lines) >= 4, run.stdout
    for line in lines:
        assert re.fullmatch(r"  base step \d+ loss \d+\.\d+ [\d,]+ tokens/s · \d+/120 "
                            r"\(\d+%\) · .+, ETA .+", line), line
    steps = [int(line.split()[2]) for line in lines]
    assert steps == sorted(steps) and steps[-1] > steps[0]


def _checkpoint_step(store: Path) -> int:
    import torch

    found = list(store.glob("work/*/checkpoints/last.ckpt"))
    try:
        return int(torch.load(found[0], map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # not there yet, or being written right now
        return 0


def test_ddp_two_cpu_processes(tmp_path, corpus):
    """strategy ddp, 2 processes (gloo): one run record, one valid model artifact."""
    text = pipeline(corpus, strategy="ddp", accelerator="cpu", devices=2)
    (tmp_path / "p.yaml").write_text(text)
    run = subprocess.run([sys.executable, "-m", "gptflow.cli", "run", "p.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    store = tmp_path / ".gptflow"
    (record_path,) = store.glob("runs/*/run.json")  # exactly one process wrote a record
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok"
    log = Path(record["nodes"]["base"]["log"]).read_text()
    assert "Starting with 2 processes" in log
    from gptflow.ml.checkpoint import load_model

    model, _ = load_model(record["nodes"]["base"]["outputs"]["model"])
    assert model.num_params() == record["nodes"]["base"]["metrics"]["params"]
    assert not [p for p in store.glob("tmp/*") if p.is_dir()]  # no staging left by any rank


def test_training_is_deterministic_on_cpu(run_pipeline, corpus):
    first = run_pipeline(pipeline(corpus, steps=8))
    files = json.loads((first.output("base") / "artifact.json").read_text())["files"]
    again = run_pipeline(pipeline(corpus, steps=8), "--force", "base")
    assert again.record["nodes"]["base"]["status"] == "ran"
    refiles = json.loads((again.output("base") / "artifact.json").read_text())["files"]
    assert refiles["model.safetensors"] == files["model.safetensors"]
    assert again.record["nodes"]["base"]["metrics"]["val_loss"] == \
        first.record["nodes"]["base"]["metrics"]["val_loss"]
