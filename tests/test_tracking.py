"""Tracking and observability: a real MLflow server, TensorBoard files that
outlive the node, observe-only params out of the cache key, a summary table
that reads at 80 columns."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_BASE


def tiny(corpus: Path, **trainer: object) -> str:
    """The tiny tokenize + pretrain pipeline with ``trainer`` settings added."""
    extra = ", ".join(f"{k}: {v}" for k, v in {"log_every_n_steps": 2, **trainer}.items())
    return ("name: trk\nnodes:\n" + TINY_BASE.format(corpus=corpus)).replace(
        "trainer: {max_steps: 10}", f"trainer: {{max_steps: 10, {extra}}}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend) on 127.0.0.1, stopped at the end."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (the tracking extra)")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            yield _wait_for(f"http://127.0.0.1:{port}", server, root / "server.log")
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_for(uri: str, server: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return uri
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not start: {log.read_text()}")
        time.sleep(0.5)


def test_mlflow_parent_and_child_runs(run_pipeline, review_corpus, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    first = run_pipeline(tiny(review_corpus), "--track", "mlflow")
    assert first.code == 0, first.out + first.err
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("trk")
    runs = client.search_runs([experiment.experiment_id])
    run_id = first.record["run_id"]
    (parent,) = [r for r in runs if r.data.tags.get("gptflow.run_id") == run_id
                 and "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["gptflow.node"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"tok", "base"}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["gptflow.pipeline_sha256"] == hashlib.sha256(
        first.pipeline.read_bytes()).hexdigest()
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["pipeline.yaml"]

    base = children["base"]
    assert base.info.status == "FINISHED"
    assert base.data.params["trainer.max_steps"] == "10"
    assert base.data.params["model.preset"] == "tiny"
    assert base.data.params["trainer.log_every_n_steps"] == "2"  # observe-only, still shown
    assert base.data.metrics["val_loss"] == pytest.approx(
        first.record["nodes"]["base"]["metrics"]["val_loss"])
    tags = base.data.tags
    assert (tags["gptflow.plugin"], tags["gptflow.status"], tags["gptflow.cached"]) == (
        "pretrain", "ran", "false")
    assert tags["gptflow.fingerprint"] == first.record["nodes"]["base"]["fingerprint"]
    curve = client.get_metric_history(base.info.run_id, "train_loss")
    assert len(curve) >= 4 and [m.step for m in curve] == sorted(m.step for m in curve)
    assert "model/loss.png" in {a.path for a in client.list_artifacts(base.info.run_id,
                                                                      "model")}

    second = run_pipeline(tiny(review_corpus), "--track", "mlflow")  # everything cached
    assert second.code == 0
    runs = client.search_runs([experiment.experiment_id])
    (parent2,) = [r for r in runs if r.data.tags.get("gptflow.run_id") == second.record["run_id"]
                  and "mlflow.parentRunId" not in r.data.tags]
    cached = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent2.info.run_id]
    assert len(cached) == 2
    for child in cached:
        assert child.data.tags["gptflow.cached"] == "true"
        assert child.data.tags["gptflow.computed_by"] == run_id


def test_a_tracking_server_that_is_not_there_is_skipped_quickly(run_pipeline, review_corpus):
    """A closed port: the run warns once, naming the address, within the connect
    timeout; every model is still trained and published (exit 1, as for any
    observer that failed: the run is ok, its tracking is not)."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (the tracking extra)")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_pipeline("name: trk\ntracking: {mlflow: {uri: '" + uri + "', "
                          "connect_timeout_s: 1}}\nnodes:\n"
                          + TINY_BASE.format(corpus=review_corpus))
    assert result.code == 1, result.out + result.err
    assert result.record["status"] == "ok"
    assert time.monotonic() - started < 60
    assert all(n["status"] == "ran" for n in result.record["nodes"].values())
    assert result.output("base", "model").is_dir()
    warnings = result.record["warnings"]
    assert len(warnings) == 1 and f"MLflow server {uri} did not answer within 1 s" in \
        warnings[0], warnings
    assert "tracking skipped" in result.out


def test_tensorboard_files_outlive_the_node(run_pipeline, review_corpus, capfd):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_pipeline(tiny(review_corpus, loggers="[tensorboard]"))
    assert result.code == 0, result.out + result.err
    folder = result.store.logger_dir(result.record["run_id"], "base") / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    assert len(events.Scalars("train_loss")) >= 4
    from gptflow.cli import main

    capfd.readouterr()
    assert main(["show", "latest", "--store", str(result.store.root)]) == 0
    assert str(folder.parent.parent) in capfd.readouterr().out.replace("\n", "")


def test_observe_only_params_leave_every_node_cached(run_pipeline, review_corpus,
                                                    gptflow_store):
    assert run_pipeline(tiny(review_corpus)).code == 0
    for change in ({"loggers": "[tensorboard]"}, {"checkpoint_every": 3},
                   {"log_every_n_steps": 5, "val_check_interval": 4}):
        again = run_pipeline(tiny(review_corpus, **change))
        assert again.code == 0
        assert {n["status"] for n in again.record["nodes"].values()} == {"cached"}, change
    from gptflow.session import Session

    path = run_pipeline(tiny(review_corpus, checkpoint_every=3), verb="plan").pipeline
    steps = Session.load(path, store=gptflow_store).plan()
    assert {s.action for s in steps} == {"cached"}
    assert steps[1].reason == ("same fingerprint (observe-only params changed: "
                               "trainer.checkpoint_every)")  # against the stored artifact


def test_intermediate_validation_does_not_change_the_model(tmp_path, review_corpus):
    """What makes val_check_interval observe-only: the trained weights are the same."""
    from gptflow.session import run_pipeline

    digests = []
    for k, extra in enumerate(({}, {"val_check_interval": 3, "limit_val_batches": 2})):
        path = tmp_path / f"p{k}.yaml"
        path.write_text(tiny(review_corpus, **extra))
        record = run_pipeline(path, store=tmp_path / f"store{k}")
        model = Path(record.nodes["base"].outputs["model"]) / "model.safetensors"
        digests.append(hashlib.sha256(model.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_summary_table_reads_at_80_columns(tmp_path, review_corpus):
    """The closing table in a pipe: every line under 80 characters, at most three
    lines per node, no metric broken across lines."""
    text = tiny(review_corpus) + """\
  sft:
    plugin: instruction-finetune
    inputs: {model: base}
    params: {tasks: ["builtin:sentiment4?n=60&test=10"], trainer: {max_steps: 2},
             batch_size: 4}
  eval:
    plugin: evaluate
    inputs: {models: [base, sft]}
    params: {tasks: ["builtin:sentiment4?n=60&test=10"], max_instances: 8}
"""
    (tmp_path / "p.yaml").write_text(text)
    env = {**os.environ, "COLUMNS": "80"}
    run = subprocess.run([sys.executable, "-m", "gptflow.cli", "run", "p.yaml"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run 20"))
    table = lines[start:lines.index("", start)]
    assert all(len(line) <= 80 for line in table), "\n".join(table)
    rows = [line for line in table[3:] if line.strip()]
    assert len(rows) <= 3 * 4  # four nodes
    body = " ".join(rows)
    for name in ("val_loss=", "tokens_per_s=", "best_macro_f1="):
        assert name in body
    for line in rows:  # every metric whole on its line: name=value, value not cut
        for item in line.split("  "):
            if "=" in item:
                assert item.split("=", 1)[1].strip(), line
    assert "| majority |" in run.stdout  # the evaluation report follows the table
