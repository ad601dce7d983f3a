from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).parent
NI_TASKS: list[str] = yaml.safe_load(
    (TESTS.parent / "pipelines" / "natural-instructions.yaml").read_text())["vars"]["tasks"]
"""The six real Natural Instructions tasks, by name, as the shipped pipelines read them."""


@pytest.fixture(autouse=True)
def _toy_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test sees the toy node types, no third-party autoload, a hash cache of
    its own, and no network: data by name comes from $GPTFLOW_DATA (or a test's own
    server on 127.0.0.1)."""
    monkeypatch.setenv("GPTFLOW_CACHE_DIR", str(tmp_path / "host-cache"))
    monkeypatch.setenv("GPTFLOW_OFFLINE", "1")
    monkeypatch.setenv("GPTFLOW_PLUGINS", "toy_nodes")
    monkeypatch.setenv("GPTFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.delenv("GPTFLOW_STORE", raising=False)


def real_data(*values: str) -> list[Path]:
    """The files that data named ``ni:`` / ``data:`` stands for; the test is skipped,
    saying how to provide them, where they cannot be had offline."""
    from gptflow.fetch import FetchError, fetch

    try:
        return [fetch(value) for value in values]
    except FetchError as e:
        pytest.skip(f"real data not at hand (point $GPTFLOW_DATA at a copy): {e}")


def spawn(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """``gptflow ARGS --store TMP/.gptflow`` in a process of its own (``prefix``: a
    command to run it under, e.g. unshare), output piped."""
    return subprocess.Popen([*prefix, sys.executable, "-m", "gptflow.cli", *args, "--store",
                             str(tmp_path / ".gptflow")], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def tiny_training(corpus: Path, steps: int = 20, **extra: str) -> str:
    """tokenize -> pretrain of a tiny model on ``corpus``, ``extra`` trainer settings."""
    trainer = ", ".join([f"max_steps: {steps}", *(f"{k}: {v}" for k, v in extra.items())])
    return f"""\
name: tiny
nodes:
  tok:
    plugin: tokenize
    params: {{corpus: ["{corpus}"], vocab_size: 320, val_fraction: 0.1}}
  base:
    plugin: pretrain
    inputs: {{tokens: tok.tokens}}
    params:
      model: {{preset: tiny, context: 32}}
      trainer: {{{trainer}}}
      optim: {{lr: 3.0e-3, warmup_steps: 5}}
      batch_size: 8
"""


@pytest.fixture
def corpus(tmp_path):
    """400 generated reviews, as JSONL."""
    from gptflow.ml.corpora import reviews

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in reviews(400)))
    return path


TINY_BASE = """\
  tok: {{plugin: tokenize, params: {{corpus: ["{corpus}"], vocab_size: 400}}}}
  base:
    plugin: pretrain
    inputs: {{tokens: tok.tokens}}
    params: {{model: {{preset: tiny, context: 96}}, trainer: {{max_steps: 10}}, batch_size: 8}}
"""
"""Pipeline lines for a tokenizer and a tiny base model (format with corpus=...)."""


@pytest.fixture
def review_corpus(tmp_path: Path) -> Path:
    """The texts of a small builtin:sentiment4 task, as JSONL."""
    from gptflow.ml.tasks import sentiment4

    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": i.input}) + "\n"
                            for i in sentiment4(n=200, test=40).instances))
    return path


# SmolLM2-135M-Instruct's chat template, as its GGUF file holds it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
