"""The verbs that reach into artifacts: ``generate`` and ``export`` (the only
ones that import the ML library, inside the verb), and the run-record lookups
``path`` and ``show`` share."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptflow.errors import EXIT_OK, InputError


def run_record(store_root: str | None, run: str) -> Any:
    from gptflow.store import Store

    store = Store(store_root)
    try:
        run_id = store.resolve_run(run)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    return store.load_run(run_id)


def cmd_generate(args: argparse.Namespace) -> int:
    from gptflow.sources import check_source, is_hub, resolve_path

    problem = check_source(args.model, ("hub",)) if is_hub(args.model) else None
    if problem:
        raise InputError(problem)
    try:  # a package: file as the file it names, anything else as given
        args.model = resolve_path(args.model, Path())
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    folder = Path(args.model)
    if not is_hub(args.model) and not folder.is_file() and not any(
            (folder / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise InputError(f"{folder}: not a model or adapter folder (no config.json), "
                         "a GGUF file, nor a Hub id (hf:ORG/NAME)")
    if not 0 <= args.temperature < math.inf \
            or (args.top_p is not None and not 0 < args.top_p <= 1) \
            or (args.top_k is not None and args.top_k < 1) or args.max_new_tokens < 1 \
            or args.num_samples < 1:
        raise InputError("need a finite --temperature >= 0, 0 < --top-p <= 1, --top-k >= 1, "
                         "--max-new-tokens >= 1, --num-samples >= 1")
    verify_stored(folder)
    from gptflow.ml.checkpoint import load_any
    from gptflow.ml.generate import generate
    from gptflow.recipes.sources import model_path

    with reading_model(folder):
        model, tokenizer, _ = load_any(model_path(args.model), inference=True)
        prompt = (tokenizer.render_chat([{"role": "user", "content": args.prompt}])
                  if args.chat else args.prompt)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        ids = generate(model, tokenizer.encode_prompt(prompt), args.max_new_tokens,
                       args.temperature, args.top_k, args.top_p, seed, tokenizer.eot_id)
        print(("" if args.chat else args.prompt) + tokenizer.decode(ids))
        if i + 1 < args.num_samples:
            print("---")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    source, target = Path(args.model), Path(args.to)
    if not source.is_dir() and ":" in args.model:
        run, _, node = args.model.partition(":")
        source = Path(output_folder(args.store, run, node))
    if not any((source / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise InputError(f"{source}: not a model or adapter folder (no config.json)")
    verify_stored(source)
    if args.format == "gguf" and target.exists():
        raise InputError(f"{target}: exists; a GGUF export writes a new file")
    if target.is_file() or (target.is_dir() and any(target.iterdir())):
        raise InputError(f"{target}: exists and is not empty; export needs a new folder")
    from gptflow.ml.export import export

    with reading_model(source):
        what = export(source, target, args.format, args.gguf_type)
    print(f"{target}: {what}")
    return EXIT_OK


@contextlib.contextmanager
def reading_model(folder: Path) -> Iterator[None]:
    """What goes wrong reading a model file is the file's doing: one line naming it,
    an input error (exit 2), whatever the reader raised (GPTFLOW_DEBUG=1: the
    traceback)."""
    try:
        yield
    except ValueError as e:  # ModelLoadError, HFError, GGUFError, the chat template
        raise InputError(str(e) if str(e).startswith(str(folder)) else f"{folder}: {e}") \
            from None
    except Exception as e:
        if os.environ.get("GPTFLOW_DEBUG") == "1":
            raise
        raise InputError(f"{folder}: cannot be read as a model: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def verify_stored(folder: Path) -> None:
    """Refuse a stored artifact — and an adapter's base — whose files do not match
    their checksums, as ``gptflow run`` refuses it (folders outside a store: no check)."""
    from gptflow.store import Store

    todo = [folder]
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # loading will say what
            todo.append(Path(json.loads(adapter.read_text())["base_path"]))
    for path in todo:
        if (path / "artifact.json").is_file() and path.parent.parent.name == "artifacts":
            Store(path.parents[2]).artifact(path)  # raises CorruptArtifact


def output_folder(store: str | None, run: str, target: str) -> str:
    """The folder of NODE[.OUTPUT] in run ``run``."""
    from gptflow.dag import pick_output

    record = run_record(store, run)
    node, _, output = target.partition(".")
    entry = record.nodes.get(node)
    if entry is None:
        raise InputError(f"run {record.run_id} has no node {node!r}")
    if not entry.outputs:
        raise InputError(f"node {node!r} has no outputs in run {record.run_id} "
                         f"(status: {entry.status})")
    try:
        folder: str = entry.outputs[pick_output(node, output, entry.outputs)]
    except ValueError as e:
        raise InputError(str(e)) from None
    return folder
