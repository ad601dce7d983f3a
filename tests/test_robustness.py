"""Crashes, kills, corruption and concurrent runs leave the store consistent."""

from __future__ import annotations

import json
import os
import signal

from conftest import spawn, wait_for

SLOW = """\
name: slow
nodes:
  s: {plugin: slow, params: {chunks: 20, seconds: 0.1}}
"""


def test_sigkill_mid_node_then_rerun_resumes_and_trusts_nothing_half_written(tmp_path):
    (tmp_path / "p.yaml").write_text(SLOW)
    store = tmp_path / ".gptflow"
    proc = spawn(tmp_path, "run", "p.yaml")
    def halfway() -> bool:
        marks = list(store.glob("work/*/done"))
        return bool(marks) and int(marks[0].read_text() or 0) >= 5

    wait_for(halfway)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not list(store.glob("artifacts/*"))  # nothing published
    assert list(store.glob("tmp/*"))  # a half-written staging folder is left behind
    rerun = spawn(tmp_path, "run", "p.yaml")
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, out + err
    assert not list(store.glob("tmp/*"))  # the dead run's staging folder was cleaned
    (artifact,) = store.glob("artifacts/*/data")
    lines = (artifact / "text.txt").read_text().splitlines()
    assert lines == [f"chunk {i}" for i in range(20)]
    record = json.loads(next(iter(sorted(store.glob("runs/*/run.json")))).read_text())
    assert record["status"] == "running"  # the killed run's record says so ...
    show = spawn(tmp_path, "runs")
    assert "killed" in show.communicate()[0]  # ... and `gptflow runs` knows it died
    metrics = json.loads(sorted(store.glob("runs/*/run.json"))[-1].read_text())
    assert metrics["nodes"]["s"]["metrics"]["resumed_from"] >= 5  # resumed, not restarted


def test_corrupt_artifact_detected_then_force_recomputes(run_pipeline):
    text = "name: c\nnodes:\n  a: {plugin: text}\n  b: {plugin: concat, inputs: {parts: [a]}}\n"
    first = run_pipeline(text)
    target = first.output("a") / "text.txt"
    target.write_text("hellO")  # same size, different content
    result = run_pipeline(text)
    assert result.code == 1
    assert "corrupt artifact" in result.out and "sha256 mismatch" in result.out
    assert "--force a" in result.out
    assert result.record["nodes"]["b"]["status"] == "skipped"
    target.write_text("hel")  # truncated
    assert "size 3, expected 5" in run_pipeline(text).out
    fixed = run_pipeline(text, "--force", "a")
    assert fixed.code == 0, fixed.out
    assert (fixed.output("a") / "text.txt").read_text() == "hello"


def test_two_concurrent_runs_share_one_store(tmp_path):
    (tmp_path / "p.yaml").write_text(SLOW.replace("chunks: 20", "chunks: 10"))
    procs = [spawn(tmp_path, "run", "p.yaml") for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    statuses = sorted(json.loads(r.read_text())["nodes"]["s"]["status"]
                      for r in (tmp_path / ".gptflow").glob("runs/*/run.json"))
    assert statuses == ["cached", "ran"]  # one computed it, the other waited and reused it
    assert any("waiting for another run" in out for out, _ in results)
    (artifact,) = (tmp_path / ".gptflow").glob("artifacts/*/data")
    assert len((artifact / "text.txt").read_text().splitlines()) == 10
