"""The ray executor on a real local Ray cluster (127.0.0.1, 2 CPUs): the same
artifacts as local, resources and threads, a lost worker, two drivers, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TESTS, spawn, tiny_training, wait_for

from gptflow.cli import main
from gptflow.store import Store

# before ray is imported, which reads it once: 127.0.0.1 stays 127.0.0.1 (servers in tests
# bind to it alone) instead of being replaced by this machine's address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="needs the ray extra")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with 2 CPUs; its workers import the toy plugins."""
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = str(TESTS)
    head = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 80 << 20, "include_dashboard": False,
        "node_ip_address": "127.0.0.1"})
    try:
        yield head
    finally:
        head.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def ray_args(cluster, *more: str) -> list[str]:
    return ["--executor", "ray", "--executor-opt", f"address={cluster.address}", *more]


INDEPENDENT = """\
name: fan
nodes:
  a: {plugin: text, params: {text: alpha}}
  b: {plugin: text, params: {text: beta, repeat: 3}}
  c: {plugin: concat, inputs: {parts: [a, b]}}
"""


def files_of(record: dict, store: Path) -> dict[str, tuple[str, dict]]:
    found = {}
    for name, node in record["nodes"].items():
        artifact = json.loads((Path(node["outputs"]["data"]) / "artifact.json").read_text())
        found[name] = (node["fingerprint"], artifact["files"])
    return found


def test_same_artifacts_as_local_and_a_second_run_submits_nothing(run_pipeline, cluster,
                                                                   tmp_path):
    local = run_pipeline(INDEPENDENT, "--store", str(tmp_path / "local"))
    assert local.code == 0, local.out + local.err
    on_ray = run_pipeline(INDEPENDENT, *ray_args(cluster))
    assert on_ray.code == 0, on_ray.out + on_ray.err
    assert [n["status"] for n in on_ray.record["nodes"].values()] == ["ran"] * 3
    local_record = latest(Store(tmp_path / "local")).to_json()
    assert files_of(on_ray.record, on_ray.store.root) == files_of(local_record, tmp_path)
    run_id = on_ray.record["run_id"]
    assert sorted(p.name for p in (on_ray.store.run_dir(run_id) / "jobs").iterdir()) == \
        ["a.json", "b.json", "c.json"]  # the job specs that were shipped
    spec = (on_ray.store.run_dir(run_id) / "jobs" / "c.json").read_text()
    assert str(tmp_path) not in spec  # a job spec names no path of this machine

    again = run_pipeline(INDEPENDENT, *ray_args(cluster))
    assert again.code == 0
    assert [n["status"] for n in again.record["nodes"].values()] == ["cached"] * 3
    assert not (again.store.run_dir(again.record["run_id"]) / "jobs").exists()  # no task


def test_without_an_address_a_ray_of_its_own_is_started(tmp_path):
    (tmp_path / "p.yaml").write_text(INDEPENDENT)
    driver = spawn(tmp_path, "run", "p.yaml", "--executor", "ray", "--executor-opt",
                   "num_cpus=1")
    out, err = driver.communicate(timeout=240)
    assert driver.returncode == 0, out + err
    record = latest(Store(tmp_path / ".gptflow"))
    assert [n.status for n in record.nodes.values()] == ["ran"] * 3


TWO_THREADED = """\
name: threads
nodes:
  x: {plugin: threads, params: {text: x}, resources: {cpus: 1}}
  y: {plugin: threads, params: {text: y}, resources: {cpus: 1}}
"""


def test_two_one_cpu_nodes_run_at_once_with_one_thread_each(run_pipeline, cluster):
    result = run_pipeline(TWO_THREADED, *ray_args(cluster))
    assert result.code == 0, result.out + result.err
    x, y = (result.record["nodes"][n]["metrics"] for n in ("x", "y"))
    assert x["threads"] == y["threads"] == 1
    assert max(x["started"], y["started"]) < min(x["ended"], y["ended"])  # side by side


def test_nodes_too_big_for_one_ray_node_run_on_two(run_pipeline, cluster):
    """Two Ray nodes of 2 CPUs each (on this one machine): two nodes asking for 2 CPUs
    run at once, one on each, each with 2 torch threads."""
    second = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    try:
        cluster.wait_for_nodes()
        result = run_pipeline(TWO_THREADED.replace("cpus: 1", "cpus: 2"), *ray_args(cluster))
    finally:
        cluster.remove_node(second)
    assert result.code == 0, result.out + result.err
    x, y = (result.record["nodes"][n]["metrics"] for n in ("x", "y"))
    assert x["threads"] == y["threads"] == 2
    assert max(x["started"], y["started"]) < min(x["ended"], y["ended"])


def exec_nodes(store: Path) -> list[int]:
    """The pids of the exec-node processes working on ``store``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"exec-node" in argv and str(store).encode() in argv:
                found.append(int(proc.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def checkpointed(store: Path) -> bool:
    return any(store.glob("work/*/checkpoints/last.ckpt"))


def during_training(tmp_path: Path, corpus: Path, cluster, steps: int, act,
                    *options: str) -> tuple[int, str, Store]:
    """A tiny training run under Ray, ``act(driver, store)`` once it has a checkpoint;
    the driver's exit code and output, and the store."""
    (tmp_path / "p.yaml").write_text(tiny_training(corpus, steps, checkpoint_every=10))
    store = tmp_path / ".gptflow"
    driver = spawn(tmp_path, "run", "p.yaml", *ray_args(cluster, *options))
    try:
        wait_for(lambda: checkpointed(store) and exec_nodes(store), timeout=240)
        act(driver, store)
        out, err = driver.communicate(timeout=400)
    finally:
        driver.kill()
    return driver.returncode, out + err, Store(store)


def kill_its_worker(driver, store: Path) -> None:
    (worker,) = exec_nodes(store)
    os.kill(parent_of(worker), signal.SIGKILL)  # the Ray worker that runs the task


def latest(store: Store):
    return store.load_run(store.resolve_run("latest"))


def test_a_lost_worker_fails_the_node_and_the_next_run_resumes(tmp_path, corpus, cluster):
    code, out, store = during_training(tmp_path, corpus, cluster, 200, kill_its_worker)
    assert code == 1, out
    base = latest(store).nodes["base"]
    assert base.status == "failed" and "lost its Ray worker" in base.error
    assert not store.has(base.fingerprint)  # nothing half-written is trusted
    wait_for(lambda: not exec_nodes(store.root), timeout=120)  # it stopped with its worker

    rerun = spawn(tmp_path, "run", "p.yaml", *ray_args(cluster))
    out, err = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, out + err
    metrics = latest(store).nodes["base"].metrics
    assert metrics["resumed_from_step"] >= 10 and metrics["steps"] == 200


def test_with_retries_a_lost_worker_is_run_again_from_its_checkpoint(tmp_path, corpus,
                                                                     cluster):
    code, out, store = during_training(tmp_path, corpus, cluster, 120, kill_its_worker,
                                       "--executor-opt", "retries=1")
    assert code == 0, out
    base = latest(store).nodes["base"]
    assert base.status == "ran" and base.metrics["resumed_from_step"] >= 10


def test_ctrl_c_on_the_driver_cancels_the_tasks(tmp_path, corpus, cluster):
    code, out, store = during_training(tmp_path, corpus, cluster, 400,
                                       lambda driver, _: driver.send_signal(signal.SIGINT))
    assert code == 130, out
    record = latest(store)
    assert record.status == "interrupted" and record.nodes["base"].status == "interrupted"
    wait_for(lambda: not exec_nodes(store.root), timeout=120)  # the task is gone too


SLOW_PAIR = """\
name: pair
nodes:
  s: {plugin: slow, params: {chunks: 20, seconds: 0.1}, resources: {cpus: 1}}
  t: {plugin: slow, params: {chunks: 21, seconds: 0.1}, resources: {cpus: 1}}
"""


def test_two_drivers_on_one_store_compute_each_node_once(tmp_path, cluster):
    (tmp_path / "p.yaml").write_text(SLOW_PAIR)
    drivers = [spawn(tmp_path, "run", "p.yaml", *ray_args(cluster)) for _ in range(2)]
    outputs = [driver.communicate(timeout=300) for driver in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outputs
    store = Store(tmp_path / ".gptflow")
    records, problems = store.runs()
    assert len(records) == 2 and not problems
    for node in ("s", "t"):
        statuses = sorted(r.nodes[node].status.value for r in records)
        assert statuses == ["cached", "ran"], (node, statuses)
    assert main(["verify", "--all", "--store", str(store.root)]) == 0


def model_sha(store: Path) -> str:
    record = latest(Store(store))
    folder = Path(record.nodes["base"].outputs["model"])
    return json.loads((folder / "artifact.json").read_text())["files"]["model.safetensors"][
        "sha256"]


def test_ddp_under_ray_gives_the_model_local_ddp_gives(tmp_path, corpus, cluster):
    (tmp_path / "p.yaml").write_text(
        tiny_training(corpus, 12, strategy="ddp", accelerator="cpu", devices=2))
    for store, extra in (("local", []), ("ray", ray_args(cluster))):
        run = subprocess.run([sys.executable, "-m", "gptflow.cli", "run", "p.yaml", "--store",
                              store, *extra], cwd=tmp_path, capture_output=True, text=True,
                             timeout=400)
        assert run.returncode == 0, run.stdout + run.stderr
    log = Path(latest(Store(tmp_path / "ray")).nodes["base"].log).read_text()
    assert "Starting with 2 processes" in log
    assert model_sha(tmp_path / "ray") == model_sha(tmp_path / "local")


def test_a_worker_with_other_code_refuses_the_job(run_pipeline, tmp_path, monkeypatch, capfd):
    from gptflow.execute import make_job
    from gptflow.executors import event_stream, write_job
    from gptflow.session import Session

    path = tmp_path / "p.yaml"
    path.write_text(INDEPENDENT)
    session = Session.load(path, store=tmp_path / ".gptflow")
    step = session.plan()[0]
    job = make_job("20260101-000000.000-abcd", step, {}, session.plugins, session.store, {})
    job.versions["gptflow"] = "0.0.1"
    write_job(session.store, job)
    capfd.readouterr()
    code = main(["exec-node", job.run_id, job.node, "--store", str(session.store.root)])
    err = capfd.readouterr().err
    assert code == 2
    assert "refused: this worker's code differs from the driver's (gptflow" in err
    assert "0.0.1 on the driver" in err
    assert not session.store.has(job.fingerprint)
    (line,) = event_stream(session.store, job.run_id, job.node).read_text().splitlines()
    assert json.loads(line)["event"] == "Failed"


def test_a_cluster_that_is_not_there_fails_the_run_within_the_timeout(run_pipeline):
    """A closed port: one line naming the address, in seconds (Ray's client alone
    would wait about 14 minutes)."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    started = time.monotonic()
    result = run_pipeline(INDEPENDENT, "--executor", "ray", "--executor-opt",
                          f"address=127.0.0.1:{port}", "--executor-opt", "connect_timeout_s=2")
    assert result.code == 1
    assert time.monotonic() - started < 30
    line = result.err.strip()
    assert "\n" not in line
    assert f"the Ray cluster at 127.0.0.1:{port} did not answer within 2 s" in line
    assert result.record["nodes"]["a"]["status"] == "failed"


def test_a_remote_cluster_needs_a_shared_store(run_pipeline):
    remote = ["--executor", "ray", "--executor-opt", "address=10.1.2.3:6379"]
    result = run_pipeline(INDEPENDENT, *remote, verb="validate")
    assert result.code == 2
    assert "executor ray: the store" in result.err and "only this machine sees" in result.err
    told = run_pipeline(INDEPENDENT, *remote, "--executor-opt", "shared_store=true",
                        verb="validate")
    assert told.code == 0, told.err
    unknown = run_pipeline(INDEPENDENT, "--executor", "rya", verb="validate")
    assert unknown.code == 2
    assert "--executor rya: error: unknown executor 'rya'; did you mean 'ray'?" in unknown.err
    across = run_pipeline(
        "name: n\nnodes:\n  t: {plugin: tokenize, params: {corpus: [builtin:reviews]}}\n"
        "  b: {plugin: pretrain, inputs: {tokens: t.tokens}, params: {trainer: {num_nodes: 2}}}\n",
        "--executor", "ray", verb="validate")
    assert across.code == 2 and "node 'b' trains across 2 machines" in across.err
    jobs = run_pipeline(INDEPENDENT, *remote, "--executor-opt", "shared_store=true", "-j", "2")
    assert jobs.code == 2 and "--jobs is the local executor's" in jobs.err


def test_resources_are_checked_and_never_fingerprinted(run_pipeline, tmp_path):
    from gptflow.session import Session

    bad = run_pipeline(INDEPENDENT.replace("{text: alpha}}", "{text: alpha}, resources: "
                                           "{cpus: 0, memory: 8 parsecs}}"), verb="validate")
    assert bad.code == 2
    assert ":3:" in bad.err and "greater than 0" in bad.err and "'8 parsecs'" in bad.err
    plain, asked = (tmp_path / "plain.yaml", tmp_path / "asked.yaml")
    plain.write_text(INDEPENDENT)
    asked.write_text(INDEPENDENT.replace("{text: alpha}}", "{text: alpha}, resources: "
                                         "{cpus: 2, gpus: 1, memory: 8GiB}}"))
    one, two = (Session.load(p, store=tmp_path / "s") for p in (plain, asked))
    assert [s.fingerprint for s in one.plan()] == [s.fingerprint for s in two.plan()]
    node = two.pipeline.nodes["a"]
    assert node.resources.model_dump() == {"cpus": 2, "gpus": 1, "memory": 8 << 30}
    assert one.pipeline.nodes["a"].resources.model_dump() == {"cpus": 1, "gpus": 0,
                                                              "memory": None}
