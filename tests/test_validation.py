"""Every class of bad input: one FILE:LINE:COL line, exit code 2, nothing written."""

from __future__ import annotations

import re

import pytest

CASES = {
    "missing node": ("""\
name: t
nodes:
  a: {plugin: text}
  b:
    plugin: concat
    inputs: {parts: [nope]}
""", r":6:22: error: input 'nope': no node named 'nope'"),
    "missing output": ("""\
name: t
nodes:
  a: {plugin: text}
  b:
    plugin: concat
    inputs:
      parts: [a.dat]
""", r":7:15: error: node 'a' \(text\) has no output 'dat'; did you mean 'data'\?"),
    "type mismatch": ("""\
name: t
nodes:
  m: {plugin: make-model}
  b:
    plugin: concat
    inputs: {parts: [m]}
""", r":6:22: error: type mismatch: m.model is a 'model', but this input takes 'dataset'"),
    "cycle": ("""\
name: t
nodes:
  a:
    plugin: concat
    inputs: {parts: [b]}
  b:
    plugin: concat
    inputs: {parts: [a]}
""", r":3:3: error: cycle: a -> b -> a"),
    "unknown plugin": ("""\
name: t
nodes:
  a: {plugin: txet}
""", r":3:15: error: unknown plugin 'txet'; did you mean 'text'\?"),
    "unknown param": ("""\
name: t
nodes:
  a:
    plugin: text
    params:
      txt: hi
""", r":6:7: error: unknown param 'txt'; did you mean 'text'\?"),
    "ill-typed param": ("""\
name: t
nodes:
  a:
    plugin: text
    params: {repeat: many}
""", r":5:22: error: param 'repeat': Input should be a valid integer.*\(got 'many'\)"),
    "bad YAML": ("""\
name: t
nodes:
  a: {plugin: text
  b: 1
""", r":4:4: error: invalid YAML"),
    "bad interpolation": ("""\
name: t
nodes:
  a:
    plugin: text
    params: {text: "${vars.missing}"}
""", r":5:20: error: undefined variable \$\{vars.missing\}"),
    "code in interpolation": ("""\
name: t
nodes:
  a:
    plugin: text
    params: {text: "${__import__('os')}"}
""", r":5:20: error: unknown interpolation"),
    "unset env": ("""\
name: t
nodes:
  a:
    plugin: text
    params: {text: "${env:GPTFLOW_TEST_UNSET}"}
""", r":5:20: error: environment variable GPTFLOW_TEST_UNSET is not set"),
    "missing file": ("""\
name: t
nodes:
  a:
    plugin: read
    params: {path: no/such/file.txt}
""", r":5:20: error: no such file or folder: 'no/such/file.txt'"),
    "missing required input": ("""\
name: t
nodes:
  b: {plugin: concat}
""", r":3:3: error: node 'b' \(concat\) needs input 'parts' \(dataset\)"),
    "unknown top-level key": ("""\
name: t
nodes: {a: {plugin: text}}
var: {}
""", r":3:1: error: unknown top-level key 'var'; did you mean 'vars'\?"),
    "list into single slot": ("""\
name: t
nodes:
  a: {plugin: text}
  s:
    plugin: slow
    inputs: {after: [a, a]}
""", r":6:21: error: input 'after' takes one artifact, not a list"),
    "recursive alias": ("name: t\nx: &a [*a]\nnodes: {a: {plugin: text}}\n",
                        r":2:4: error: invalid YAML: nested more than 64 levels deep"),
    "5000 levels deep": ("name: t\nx: " + "[" * 5000 + "]" * 5000 + "\nnodes: {}\n",
                         r": error: invalid YAML: nested more than 64 levels deep"),
    "NUL character": ("name: t\x00\nnodes: {a: {plugin: text}}\n",
                      r":1:8: error: invalid YAML: character 0 is not allowed"),
    "alias bomb": ("name: t\na: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + "nodes: {a: {plugin: text}}\n",
        r":\d+:\d+: error: invalid YAML: expands to more than 100000 values"),
    "model shape": ("""\
name: t
nodes:
  m: {plugin: pretrain, params: {model: {preset: tiny, n_head: 0}}}
""", r":3:64: error: param 'model.n_head': Input should be greater than or equal to 1"),
    "min_lr above lr": ("""\
name: t
nodes:
  m: {plugin: pretrain, params: {optim: {lr: 1.0e-4, min_lr: 1.0e-3}}}
""", r":3:\d+: error: param 'optim': .*min_lr 0.001 is above lr 0.0001"),
    "package not installed": ("""\
name: t
nodes:
  m: {plugin: load-model, params: {path: "package:no_such_package/model.gguf"}}
""", r":3:\d+: error: 'package:no_such_package/model.gguf': no installed Python package "
     r"'no_such_package'"),
    "file not in the package": ("""\
name: t
nodes:
  m: {plugin: load-model, params: {path: "package:gptflow/model.gguf"}}
""", r":3:\d+: error: no such file or folder: "
     r"'package:gptflow/model.gguf \(.*gptflow/model.gguf\)'"),
    "non-finite number": ("""\
name: t
nodes:
  m: {plugin: pretrain, params: {optim: {lr: .nan}}}
""", r":3:\d+: error: param 'optim.lr': Input should be a finite number"),
    "a generated task of 10^12 instances": ("""\
name: t
nodes:
  m: {plugin: load-model, params: {path: "package:gptflow/__init__.py"}}
  f: {plugin: instruction-finetune, inputs: {model: m},
      params: {tasks: ["builtin:sentiment4?n=1000000000000"]}}
""", r":5:\d+: error: 'builtin:sentiment4\?n=1000000000000': \?n=1000000000000: a whole "
     r"number from 0 to 1,000,000"),
    "a template that pads to 10 GB": ("""\
name: t
nodes:
  m: {plugin: load-model, params: {path: "package:gptflow/__init__.py"}}
  f: {plugin: instruction-finetune, inputs: {model: m},
      params: {tasks: [builtin:sentiment4], template: "{input:>10000000000}"}}
""", r":5:\d+: error: param 'template': \{input\} takes no format spec or conversion"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("verb", ["validate", "run"])
def test_bad_input_is_one_line_exit_2_nothing_written(run_pipeline, case, verb):
    text, expected = CASES[case]
    result = run_pipeline(text, verb=verb)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert re.search(re.escape(str(result.pipeline)) + expected, lines[0]), lines[0]
    assert "Traceback" not in result.err
    assert not result.store.root.exists()


def test_not_utf8_pipeline_and_bombs_are_quick(run_pipeline, tmp_path):
    import time

    from gptflow.cli import main

    path = tmp_path / "latin.yaml"
    path.write_bytes("name: caf\xe9\nnodes: {a: {plugin: text}}\n".encode("latin-1"))
    assert main(["validate", str(path)]) == 2
    started = time.perf_counter()
    assert run_pipeline(CASES["alias bomb"][0], verb="validate").code == 2
    assert time.perf_counter() - started < 1.0


def test_a_set_value_and_an_env_value_meet_the_pipeline_files_limits(run_pipeline,
                                                                      monkeypatch):
    """One YAML loader: a 300-byte alias bomb given with --set or in ${env:X} is
    refused at once, as it is in the file."""
    import time

    bomb = "[&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefg", "bcdefgh",
                                                              strict=True)) + "]"
    started = time.perf_counter()
    result = run_pipeline("name: t\nnodes:\n  a: {plugin: text}\n", "--set",
                          f"vars.x={bomb}", verb="validate")
    assert result.code == 2
    assert result.err.startswith("--set vars.x:1:")
    assert "expands to more than 100000 values" in result.err
    monkeypatch.setenv("GPTFLOW_TEST_BOMB", bomb)
    result = run_pipeline("name: t\nvars: {x: '${env:GPTFLOW_TEST_BOMB}'}\n"
                          "nodes:\n  a: {plugin: text}\n", verb="validate")
    assert result.code == 2 and "expands to more than 100000 values" in result.err
    assert time.perf_counter() - started < 2.0
    lenient = run_pipeline("name: t\nvars: {x: 1}\nnodes:\n  a: {plugin: text}\n",
                           "--set", "vars.x=a: b: c", verb="validate")
    assert lenient.code == 0, lenient.err  # not YAML: the string as written


def test_all_problems_reported_at_once(run_pipeline):
    result = run_pipeline("""\
name: t
nodes:
  a: {plugin: text, params: {txt: 1}}
  b: {plugin: nope}
""", verb="validate")
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 2


def test_set_override_bad_node(run_pipeline):
    result = run_pipeline("name: t\nnodes:\n  a: {plugin: text}\n", "--set", "x.params.text=1",
                          verb="validate")
    assert result.code == 2
    assert "--set x.params.text: no node named 'x'" in result.err


def test_set_override_is_typed_and_located(run_pipeline):
    result = run_pipeline("name: t\nnodes:\n  a: {plugin: text}\n",
                          "--set", "a.params.repeat=oops", verb="validate")
    assert result.code == 2
    assert result.err.startswith("--set a.params.repeat: error: param 'repeat'")
    ok = run_pipeline("name: t\nnodes:\n  a: {plugin: text}\n", "--set", "a.params.repeat=3")
    assert ok.code == 0, ok.err
    assert (ok.output("a") / "text.txt").read_text() == "hello" * 3


def test_interpolation_keeps_types_and_reads_env(run_pipeline, monkeypatch):
    monkeypatch.setenv("GPTFLOW_TEST_REPEAT", "2")
    result = run_pipeline("""\
name: t
vars: {word: ab}
nodes:
  a:
    plugin: text
    params: {text: "<${vars.word}>", repeat: "${env:GPTFLOW_TEST_REPEAT,5}"}
""")
    assert result.code == 0, result.err
    assert (result.output("a") / "text.txt").read_text() == "<ab><ab>"


def test_missing_pipeline_file(run_pipeline, tmp_path):
    from gptflow.cli import main

    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
