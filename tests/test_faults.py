"""Faults: no wrong model after a crash, a signal or a divergence, and no store
one bad file can break. Training faults are injected at exact steps by
``fault_plugin`` (a real SIGKILL, SIGTERM or SIGINT to the node's process)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TESTS, spawn, wait_for

from gptflow.ml.corpora import reviews
from gptflow.store import Store

TRAIN = """\
name: train
nodes:
  tok: {{plugin: tokenize, params: {{corpus: ["{corpus}"], vocab_size: 320}}}}
  base:
    plugin: pretrain
    inputs: {{tokens: tok.tokens}}
    params:
      model: {{preset: tiny, context: 32, dropout: 0.1}}
      trainer: {{max_steps: 12, checkpoint_every: 3}}
      optim: {{lr: {lr}}}
      batch_size: 8
  sft:
    plugin: instruction-finetune
    inputs: {{model: base}}
    params: {{tasks: ["builtin:sentiment4?n=80&test=16"], batch_size: 4,
             trainer: {{max_steps: 12, checkpoint_every: 3}}}}
  lora:
    plugin: lora
    inputs: {{model: base}}
    params: {{tasks: ["builtin:sentiment4?n=80&test=16"], batch_size: 4, rank: 2, dropout: 0.1,
             trainer: {{max_steps: 12, checkpoint_every: 3}}}}
  kd:
    plugin: distill
    inputs: {{teacher: base, tokens: tok.tokens}}
    params: {{model: {{preset: tiny, d_model: 32, n_head: 2, context: 32}}, batch_size: 4,
             trainer: {{max_steps: 12, checkpoint_every: 3}}}}
"""


@pytest.fixture(scope="module")
def train_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in reviews(200)))
    path = folder / "train.yaml"
    path.write_text(TRAIN.format(corpus=corpus, lr="3.0e-3"))
    return path


@pytest.fixture(scope="module")
def reference(train_yaml: Path) -> dict[str, str]:
    """The digests of the models an uninterrupted run publishes."""
    store = train_yaml.parent / "reference"
    done = gptflow(store, "run", str(train_yaml))
    assert done.returncode == 0, done.stdout + done.stderr
    return {node: model_digest(store, node) for node in ("base", "sft", "lora", "kd")}


def gptflow(store: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPTFLOW_PLUGINS": "toy_nodes,fault_plugin", "GPTFLOW_FAULT": fault,
           "PYTHONPATH": str(TESTS), "GPTFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "gptflow.cli", *args, "--store", str(store)],
                          env=env, capture_output=True, text=True, timeout=300)


def latest(store: Path) -> dict:
    return json.loads(sorted(store.glob("runs/*/run.json"))[-1].read_text())


def model_digest(store: Path, node: str) -> str:
    """sha256 of the weights a node published (a model, or an adapter)."""
    (folder,) = latest(store)["nodes"][node]["outputs"].values()
    (weights,) = Path(folder).glob("*.safetensors")
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def checkpoints(store: Path) -> Path:
    (folder,) = {p.parent for p in store.glob("work/*/checkpoints/*.ckpt")}
    return folder


@pytest.mark.torch
def test_kills_at_any_step_then_resume_give_the_uninterrupted_model(tmp_path, train_yaml,
                                                                    reference):
    """kill -9 at three steps of pretrain and of instruction-finetune (and a
    damaged last.ckpt on the way): the published models are byte-identical to
    those of an uninterrupted run."""
    store = tmp_path / "store"
    for node in ("base", "sft"):
        for step in (4, 8, 11):
            killed = gptflow(store, "run", str(train_yaml), fault=f"{node}:batch:{step}:KILL")
            assert killed.returncode == -signal.SIGKILL
            assert latest(store)["nodes"][node]["status"] == "running"  # as it was killed
            if node == "base" and step == 8:  # the checkpoint of step 6 lost half its bytes
                last = checkpoints(store) / "last.ckpt"
                last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    shown = gptflow(store, "show", "latest", "--json")
    assert json.loads(shown.stdout)["nodes"]["sft"]["status"] == "interrupted"
    assert json.loads(shown.stdout)["status"] == "killed"
    final = gptflow(store, "run", str(train_yaml))
    assert final.returncode == 0, final.stdout + final.stderr
    for node in ("base", "sft"):
        assert model_digest(store, node) == reference[node], node
    assert latest(store)["nodes"]["sft"]["metrics"]["resumed_from_step"] == 9
    assert not list(store.glob("work/*"))  # checkpoints go once the node is published


@pytest.mark.torch
def test_lora_and_distill_resume_exactly_too(tmp_path, train_yaml, reference):
    store = tmp_path / "store"
    for node in ("lora", "kd"):
        killed = gptflow(store, "run", str(train_yaml), fault=f"{node}:batch:7:KILL")
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    final = gptflow(store, "run", str(train_yaml))
    assert final.returncode == 0, final.stdout + final.stderr
    for node in ("lora", "kd"):
        assert latest(store)["nodes"][node]["metrics"]["resumed_from_step"] == 6, node
        assert model_digest(store, node) == reference[node], node


def stop_with(store: Path, train_yaml: Path, name: str, code: int) -> None:
    """Send SIG``name`` at training step 5 of base: the run stops, says so, publishes nothing."""
    stopped = gptflow(store, "run", str(train_yaml), "--only", "tok", "base",
                      fault=f"base:batch:5:{name}")
    assert stopped.returncode == code, stopped.stdout + stopped.stderr
    record = latest(store)
    assert record["status"] == "interrupted" and record["signal"] == f"SIG{name}"
    assert record["nodes"]["base"]["status"] == "interrupted"
    assert not list(store.glob("artifacts/*/model"))
    assert gptflow(store, "runs").stdout.count("interrupted") == 1


@pytest.mark.torch
def test_sigint_stops_at_a_step_with_a_checkpoint_and_the_rerun_resumes(tmp_path, train_yaml,
                                                                        reference):
    store = tmp_path / "store"
    stop_with(store, train_yaml, "INT", 130)
    rerun = gptflow(store, "run", str(train_yaml), "--only", "tok", "base")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the signal came after gptflow's check of step 5 (the fault plugin's callback runs
    # last), so the node finished step 6, saved a checkpoint there and stopped
    assert latest(store)["nodes"]["base"]["metrics"]["resumed_from_step"] == 6
    assert model_digest(store, "base") == reference["base"]


@pytest.mark.torch
def test_sigterm_stops_with_a_checkpoint_and_a_damaged_one_falls_back(tmp_path, train_yaml,
                                                                      reference):
    store = tmp_path / "store"
    stop_with(store, train_yaml, "TERM", 143)  # Lightning stops at the end of step 5
    folder = checkpoints(store)
    assert torch_step(folder / "last.ckpt") == 5 and torch_step(folder / "previous.ckpt") == 3
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")  # a full disk, say
    rerun = gptflow(store, "run", str(train_yaml), "--only", "tok", "base")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "last.ckpt does not load" in rerun.stdout
    assert "resuming from previous.ckpt (step 3)" in rerun.stdout
    entry = latest(store)["nodes"]["base"]
    assert entry["metrics"]["resumed_from_step"] == 3
    assert any("set aside as last.ckpt.unreadable" in w for w in entry["warnings"])
    assert model_digest(store, "base") == reference["base"]


def torch_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.torch
def test_resume_from_the_final_checkpoint_reports_the_whole_run(tmp_path, train_yaml):
    store = tmp_path / "store"
    gptflow(store, "run", str(train_yaml), "--only", "tok", "base",
            fault="base:train_end:12:KILL")
    rerun = gptflow(store, "run", str(train_yaml), "--only", "tok", "base")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    metrics = latest(store)["nodes"]["base"]["metrics"]
    assert metrics["resumed_from_step"] == 12 and metrics["steps"] == 12
    assert metrics["tokens"] == 12 * 8 * 32 and metrics["tokens_per_s"] > 0
    assert metrics["train_loss"] > 0


@pytest.mark.torch
@pytest.mark.parametrize("lr", ["1.0e6", ".inf"])
def test_a_diverged_model_fails_and_is_never_published(run_pipeline, tmp_path, lr):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in reviews(200)))
    text = TRAIN.format(corpus=corpus, lr=lr)
    result = run_pipeline(text, "--only", "tok", "base")
    if lr == ".inf":  # known before anything runs
        assert result.code == 2 and "optim.lr" in result.err, result.err
        return
    assert result.code == 1
    error = result.record["nodes"]["base"]["error"]
    assert "diverged" in error or "NaN or inf" in error, error
    assert not list(result.store.root.glob("artifacts/*/model"))
    again = run_pipeline(text, "--only", "tok", "base")  # not cached: it fails again
    assert again.record["nodes"]["base"]["status"] == "failed"


@pytest.mark.torch
def test_non_finite_weights_are_never_saved(tmp_path):
    import torch

    from gptflow.ml.checkpoint import NonFiniteWeights, save_model
    from gptflow.ml.config import GPTConfig
    from gptflow.ml.model import GPT
    from gptflow.ml.tokenizer import Tokenizer

    model = GPT(GPTConfig(vocab_size=64, context=8, n_layer=1, n_head=2, d_model=16))
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="NaN or inf"):
        save_model(tmp_path / "m", model, Tokenizer.train_char(["a b c"]))
    assert not (tmp_path / "m" / "model.safetensors").exists()


# -- the store ---------------------------------------------------------------------------
TOY = "name: toy\nnodes:\n  a: {plugin: text}\n  b: {plugin: concat, inputs: {parts: [a]}}\n"


def test_one_bad_metadata_file_never_breaks_the_store(run_pipeline, capfd):
    from gptflow.cli import main

    first = run_pipeline(TOY)
    assert first.code == 0
    store = first.store.root
    (store / "runs" / "00000000-000000.000-dead").mkdir(parents=True)
    (store / "runs" / "00000000-000000.000-dead" / "run.json").write_bytes(b"")
    for verb in ("plan", "run"):
        assert run_pipeline(TOY, verb=verb).code == 0, verb
    assert main(["runs", "--store", str(store)]) == 0
    err = capfd.readouterr().err
    assert "skipped" in err and "000-dead/run.json" in err

    node_json = Path(first.record["nodes"]["a"]["outputs"]["data"]).parent / "node.json"
    node_json.write_text("garbage")
    broken = run_pipeline(TOY)
    assert broken.code == 1 and "node.json" in broken.out and "--force a" in broken.out
    fixed = run_pipeline(TOY, "--force", "a")
    assert fixed.code == 0, fixed.out + fixed.err

    cache = Store(store).hash_cache
    cache.write_bytes(b"garbage " * 100)
    for suffix in ("-wal", "-shm"):
        cache.with_name(cache.name + suffix).unlink(missing_ok=True)
    again = run_pipeline(TOY)
    assert again.code == 0, again.out + again.err
    assert again.record["nodes"]["a"]["status"] == "cached"  # verified with a rebuilt cache


@pytest.mark.torch
def test_byte_flip_with_mtime_restored_is_found_and_refused(run_pipeline, tmp_path, capfd):
    from conftest import TINY_BASE

    from gptflow.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in reviews(200)))
    first = run_pipeline("name: m\nnodes:\n" + TINY_BASE.format(corpus=corpus))
    assert first.code == 0, first.out
    model = first.output("base")
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before
    store = str(first.store.root)
    capfd.readouterr()
    assert main(["generate", str(model), "--prompt", "x", "--max-new-tokens", "2"]) == 1
    assert "sha256 mismatch" in capfd.readouterr().err
    assert main(["verify", "--store", store]) == 1
    out = capfd.readouterr().out
    assert "corrupt:" in out and "--force base" in out
    # bit rot beneath the file system: the stat cache cannot see it, --full can
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["verify", "--store", store]) == 0  # re-hashed once: the cache is fresh
    db = sqlite3.connect(Store(store).hash_cache)
    with db:
        db.execute("UPDATE files SET sha256 = ? WHERE path = ?",
                   ("0" * 64, str(weights.resolve())))
    db.close()
    assert main(["verify", "--store", store]) == 1  # a cache that lies is caught ...
    capfd.readouterr()
    assert main(["verify", "--store", store, "--full"]) == 0  # ... and --full re-hashes it
    assert "every byte re-hashed" in capfd.readouterr().out


SLOW = "name: slow\nnodes:\n  s: {plugin: slow, params: {chunks: 40, seconds: 0.1}}\n"
TWO_SLOW = ("name: two\nnodes:\n  s: {plugin: slow, params: {chunks: 60, seconds: 0.1}}\n"
            "  t: {plugin: slow, params: {chunks: 61, seconds: 0.1}}\n")


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def gone(pids: set[int]) -> bool:
    """None of ``pids`` runs any more (zombies, dead but not yet reaped, count as gone)."""
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return False
        except OSError:
            pass
    return True


def start_two_workers(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, set[int]]:
    """A --jobs 2 run of two slow nodes, once both workers are writing: the run, its
    store, and every process under it."""
    (tmp_path / "p.yaml").write_text(TWO_SLOW)
    proc = spawn(tmp_path, "run", "p.yaml", "--jobs", "2")
    store = tmp_path / ".gptflow"
    wait_for(lambda: len(list(store.glob("work/*/done"))) == 2, timeout=60)
    return proc, store, descendants(proc.pid)


def test_killed_parent_leaves_no_worker_running_and_nothing_published(tmp_path):
    proc, store, workers = start_two_workers(tmp_path)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    wait_for(lambda: gone(workers), timeout=20)
    assert not list(store.glob("artifacts/*"))


def test_sigterm_to_a_parallel_run_stops_its_workers_and_records_it(tmp_path):
    proc, store, workers = start_two_workers(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    record = latest(store)
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    assert {n["status"] for n in record["nodes"].values()} == {"interrupted"}
    wait_for(lambda: gone(workers), timeout=20)  # the forkserver too, once it sees EOF
    assert not list(store.glob("artifacts/*"))


def test_a_run_in_another_pid_namespace_leaves_a_live_run_alone(tmp_path):
    unshare = ("unshare", "--pid", "--fork", "--mount-proc")
    if subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow PID namespaces")
    (tmp_path / "p.yaml").write_text(SLOW)
    (tmp_path / "q.yaml").write_text(TOY)
    store = tmp_path / ".gptflow"
    procs = []
    try:
        live = spawn(tmp_path, "run", "p.yaml")
        procs.append(live)
        wait_for(lambda: bool(list(store.glob("tmp/*"))), timeout=60)
        other = spawn(tmp_path, "run", "q.yaml", prefix=unshare)  # as PID 1 of its namespace
        procs.append(other)
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0, out + err
        assert list(store.glob("tmp/*"))  # the live run's staging is still there
        out, err = live.communicate(timeout=60)
        assert live.returncode == 0, out + err

        # a run killed inside a namespace: unknown from outside until its lease expires
        victim = spawn(tmp_path, "run", "p.yaml", "--force", prefix=(*unshare, "--kill-child"))
        procs.append(victim)
        wait_for(lambda: len(list(store.glob("runs/*/run.json"))) == 3
                 and latest(store)["nodes"].get("s", {}).get("status") == "running",
                 timeout=60)
        victim.kill()  # unshare, and with it (--kill-child) gptflow, PID 1 of its namespace
        victim.communicate()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    run_id = latest(store)["run_id"]
    assert "running" in spawn(tmp_path, "show", run_id).communicate()[0]
    old = time.time() - 600
    os.utime(store / "runs" / run_id / "heartbeat", (old, old))
    assert "killed" in spawn(tmp_path, "show", run_id).communicate()[0]


HOST_B = ("unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
          'hostname host-b && exec "$0" "$@"')  # another host's identity, on this machine


def test_two_hosts_on_one_store_respect_each_others_live_work(tmp_path):
    """What host B holds (its run, its staging, its lock) is alive to host A while B's
    leases are fresh, whatever A's pid checks say; once they expire, A takes over."""
    if subprocess.run([*HOST_B[:-3], "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow UTS and PID namespaces")
    (tmp_path / "p.yaml").write_text(SLOW.replace("chunks: 40", "chunks: 300"))
    store = tmp_path / ".gptflow"
    b = spawn(tmp_path, "run", "p.yaml", prefix=HOST_B)
    a = None
    try:
        wait_for(lambda: (store / "work").is_dir() and any(store.glob("work/*/done")),
                 timeout=60)
        b_run = latest(store)
        assert b_run["owner"]["host"] == "host-b"
        staging = list(store.glob("tmp/*"))
        a = spawn(tmp_path, "run", "p.yaml")  # host A: the same node, the same store
        wait_for(lambda: len(list(store.glob("runs/*/run.json"))) == 2, timeout=60)
        time.sleep(3.0)  # A has planned, cleaned and found the lock taken
        assert a.poll() is None  # waiting for B's lock, not breaking it
        assert all(p.exists() for p in staging)  # B's staging is B's
        b.kill()  # host B is gone: nobody there to say so
        b.communicate()
        shown = spawn(tmp_path, "show", b_run["run_id"]).communicate()[0]
        assert "running" in shown  # from host A, only B's lease can tell, and it is fresh
        old = time.time() - 600
        for lease in [*store.glob("locks/*.lock"), store / "runs" / b_run["run_id"] /
                      "heartbeat"]:
            os.utime(lease, (old, old))  # ... until it expires
        out, err = a.communicate(timeout=120)
        assert a.returncode == 0, out + err
        assert "waiting for another run that holds its lock" in out
    finally:
        for proc in (b, a):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert "killed" in spawn(tmp_path, "show", b_run["run_id"]).communicate()[0]
    assert latest(store)["nodes"]["s"]["metrics"]["resumed_from"] > 0  # from B's work


def test_leftovers_of_crashes_are_cleaned_by_the_next_run(run_pipeline):
    first = run_pipeline(TOY)
    store = first.store.root
    fp = first.record["nodes"]["a"]["fingerprint"]
    (store / "work" / fp).mkdir(parents=True)  # a kill between publish and cleanup
    (store / "work" / fp / "last.ckpt").write_bytes(b"x")
    run_dir = store / "runs" / first.record["run_id"]
    (run_dir / ".run.json.123.tmp").write_text("{")  # a full disk mid-write
    run_pipeline(TOY)
    assert not (store / "work" / fp).exists()
    assert not (run_dir / ".run.json.123.tmp").exists()


# -- bad data: one located line ----------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize(("content", "expected"), [
    (b"\xff\xfe binary", "corpus.txt:1: not UTF-8 text (byte 0"),
    (b'{"text": "fine"}\n{"text": null}\n', "corpus.jsonl:2: field 'text' is null, not a string"),
    (b"", "holds no text"),
])
def test_bad_corpora_fail_naming_the_file_and_line(run_pipeline, tmp_path, content, expected):
    name = "corpus.jsonl" if content.startswith(b"{") else "corpus.txt"
    (tmp_path / name).write_bytes(content)
    result = run_pipeline("name: c\nnodes:\n  tok: {plugin: tokenize, params: "
                          f"{{corpus: ['{tmp_path / name}'], vocab_size: 300, "
                          "val_fraction: 0.5}}\n")
    assert result.code == 1
    assert expected in result.record["nodes"]["tok"]["error"]
    assert not list(result.store.root.glob("artifacts/*"))


NI_TASK = {"Definition": ["Say yes."], "Positive Examples": [{"input": "a", "output": "yes"}],
           "Instances": [{"id": "t-1", "input": "b", "output": ["yes"]}]}


@pytest.mark.parametrize(("change", "expected"), [
    ({"Instances": {"id": "t-1"}}, "Instances: Input should be a valid list"),
    ({"Instances": [{"id": "t-1", "output": ["yes"]}]}, "Instances[0].input: Field required"),
    ({"Instances": [{"input": "b", "output": [3]}]}, "Instances[0].output"),
    ({"Definition": [" "]}, "Definition"),
    ({"Instances": []}, "Instances: List should have at least 1 item"),
])
def test_malformed_natural_instructions_name_the_file_and_field(tmp_path, change, expected):
    from gptflow.ml.tasks import load_natural_instructions

    path = tmp_path / "task1_x.json"
    path.write_text(json.dumps({**NI_TASK, **change}))
    with pytest.raises(ValueError, match="not a Natural Instructions task") as e:
        load_natural_instructions(path)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value), str(e.value)


@pytest.mark.parametrize(("record", "expected"), [
    ({"input": "b", "output": None}, ":2: field 'output' is null, not a string"),
    ({"input": "b", "output": 3}, ":2: field 'output' is a number, not a string"),
    ({"input": "b", "output": []}, ":2: field 'output' is a list, not a string"),
    ({"input": ["b"], "output": "yes"}, ":2: field 'input' is a list, not a string"),
    ({"instruction": {"x": 1}, "input": "b", "output": "yes"},
     ":2: field 'instruction' is an object, not a string"),
])
def test_instruction_data_that_is_not_text_names_the_row(tmp_path, record, expected):
    """Not trained on as the text "None": refused, naming the file, row and field."""
    from gptflow.ml.tasks import load_jsonl

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"input": "a", "output": ["yes", "aye"]}) + "\n"
                    + json.dumps(record) + "\n")
    with pytest.raises(ValueError) as e:
        load_jsonl(path, ("instruction", "input", "output"))
    assert str(e.value) == f"{path}{expected}" + (
        " (or a list of reference strings)" if "'output'" in expected else "")


def test_chat_data_without_an_assistant_turn_names_the_row(tmp_path):
    from gptflow.ml.tasks import load_conversations

    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(ValueError, match=f"^{path}:2: no assistant message"):
        load_conversations(path, "train")


@pytest.mark.torch
def test_a_shard_index_may_not_reach_outside_the_model_folder(tmp_path):
    from gptflow.ml.families import HFError
    from gptflow.ml.hf import read_tensors

    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(HFError, match="outside the model folder"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--num-samples", "0"]])
def test_generate_refuses_meaningless_sampling(tmp_path, capfd, flags):
    from gptflow.cli import main

    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", str(tmp_path), "--prompt", "x", *flags]) == 2
    assert "--num-samples >= 1" in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kills_never_leave_a_wrong_or_trusted_half_artifact(tmp_path, train_yaml,
                                                                    reference):
    """The regression guard: kill -9 a real training pipeline at random moments
    (GPTFLOW_FAULT_KILLS times, 6 by default); after each kill every artifact in the
    store must re-hash to its checksums; in the end the models must be the
    uninterrupted run's, byte for byte."""
    import random

    rng = random.Random(0)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "GPTFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "gptflow.cli", "run", str(train_yaml), "--store",
               str(store)]
    for _ in range(int(os.environ.get("GPTFLOW_FAULT_KILLS", "6"))):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 25.0))
        proc.kill()
        proc.wait()
        check = gptflow(store, "verify", "--all", "--full")
        assert check.returncode == 0, check.stdout
        assert gptflow(store, "runs").returncode == 0
    final = gptflow(store, "run", str(train_yaml))
    assert final.returncode == 0, final.stdout + final.stderr
    for node in ("base", "sft"):
        assert model_digest(store, node) == reference[node], node
