"""The example third-party plugin, installed into a fresh venv, used from a pipeline."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "gptflow-wordcount"


def test_example_plugin_in_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run([python, "-c", where],
                             capture_output=True, text=True, check=True).stdout.strip()
    # gptflow and its dependencies come from this interpreter's environment
    (Path(purelib) / "parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", tmp_path / "dist", EXAMPLE],
                           capture_output=True, text=True)
    assert wheel.returncode == 0, wheel.stderr
    (built,) = (tmp_path / "dist").glob("*.whl")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", built],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items()
           if k not in ("GPTFLOW_PLUGINS", "GPTFLOW_DISABLE_PLUGIN_AUTOLOAD", "PYTHONPATH")}
    env["COLUMNS"] = "200"
    (tmp_path / "words.txt").write_text("gptflow gptflow plugins")
    (tmp_path / "p.yaml").write_text(
        "name: w\nnodes:\n  count: {plugin: word-count, params: {files: [words.txt], top: 1}}\n")
    gptflow = [str(env_dir / "bin" / "python"), "-m", "gptflow.cli"]
    listing = subprocess.run([*gptflow, "plugins"], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
    assert "word-count" in listing.stdout and "gptflow-wordcount" in listing.stdout, listing
    run = subprocess.run([*gptflow, "run", "p.yaml"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    report = next((tmp_path / ".gptflow" / "artifacts").glob("*/report/report.md")).read_text()
    assert "| gptflow | 2 |" in report
