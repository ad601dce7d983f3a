"""The ``gptflow`` command. Verbs that only read pipelines (validate, plan,
graph, plugins, schema, --help) import no torch."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptflow.cli_models import cmd_export, cmd_generate, output_folder, run_record
from gptflow.errors import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, InputError
from gptflow.manager import PluginError
from gptflow.signals import Interrupted


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INPUT
    try:
        code: int = args.func(args)
        return code
    except InputError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_INPUT
    except PluginError as e:  # a plugin that cannot load as written: input too
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted as e:
        print(f"interrupted ({e.name})", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug or an environment problem: one line unless debugging
        if os.environ.get("GPTFLOW_DEBUG") == "1":
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptflow", description="Declarative, cached, resumable pipelines for GPT models.")
    verbs = parser.add_subparsers(metavar="VERB")

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str,
             pipeline: bool = False) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--store", help="store folder (default: $GPTFLOW_STORE or .gptflow)")
        if pipeline:
            p.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML file")
            p.add_argument("--set", dest="overrides", action="append", default=[],
                           metavar="PATH=VALUE",
                           help="override a value: vars.X=1 or NODE.params.a.b=2")
            p.add_argument("--executor", default=None, metavar="NAME",
                           help="where nodes run: local (default), ray, or an installed "
                                "plugin's; replaces the pipeline's executor: block")
            p.add_argument("--executor-opt", dest="executor_opts", action="append", default=[],
                           metavar="KEY=VALUE", help="an executor option, e.g. address=auto")
        return p

    p = verb("run", cmd_run, "run what is not cached, in dependency order", pipeline=True)
    p.add_argument("--only", nargs="+", default=[], metavar="NODE", help="run only these nodes")
    p.add_argument("--from", dest="start", nargs="+", default=[], metavar="NODE",
                   help="run these nodes and everything downstream")
    p.add_argument("--force", nargs="*", metavar="NODE",
                   help="re-run these nodes (all selected nodes when none named) even if cached")
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    p.add_argument("--jobs", "-j", type=int, default=None, metavar="K",
                   help="run up to K independent nodes in parallel processes (the local "
                        "executor)")
    p.add_argument("--track", action="append", default=[], metavar="TRACKER",
                   help="track the run (e.g. mlflow; MLFLOW_TRACKING_URI is honoured), as "
                        "the pipeline's tracking: block does")
    verb("validate", cmd_validate, "check a pipeline; runs nothing", pipeline=True)
    verb("plan", cmd_plan, "which nodes would run and which are cached, and why", pipeline=True)
    p = verb("graph", cmd_graph, "draw the DAG", pipeline=True)
    p.add_argument("--format", choices=("text", "mermaid", "dot"), default="text")
    p = verb("plugins", cmd_plugins, "installed node types, their slots and params")
    p.add_argument("name", nargs="?", metavar="NAME", help="show one node type in full")
    verb("schema", cmd_schema, "JSON Schema of the pipeline format")
    verb("runs", cmd_runs, "list past runs")
    p = verb("show", cmd_show, "one run: node statuses, timings, metrics")
    p.add_argument("run", metavar="RUN", help="a run id (or a unique prefix) or 'latest'")
    p.add_argument("--json", action="store_true", help="print run.json")
    p = verb("generate", cmd_generate, "sample text from a model artifact (KV cache)")
    p.add_argument("model", metavar="MODEL",
                   help="a model or adapter artifact folder (gptflow path ...), a Hugging "
                        "Face folder, a Hub id (hf:ORG/NAME@REVISION) or a GGUF file")
    p.add_argument("--prompt", default="", help="text to continue (with --chat: the user's "
                                                "message)")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p = verb("export", cmd_export,
             "write a model or adapter as a Hugging Face folder or a GGUF file")
    p.add_argument("model", metavar="MODEL",
                   help="a model or adapter artifact folder, or RUN:NODE[.OUTPUT] "
                        "(e.g. latest:sft)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="a new (or empty) folder; with --format gguf, a new file")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a Hugging Face folder in the family's layout (a PEFT adapter "
                        "where exact); gguf: one GGUF file (--to FILE.gguf) for llama.cpp, "
                        "ollama and transformers")
    p.add_argument("--gguf-type", default=None, metavar="TYPE",
                   help="GGUF weight type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 "
                        "(default: f16; q8_0 for int8 models, q4_0 for int4 and NF4)")
    p = verb("verify", cmd_verify, "re-check stored artifacts against their checksums")
    p.add_argument("run", nargs="?", default="latest", metavar="RUN",
                   help="the artifacts of this run (default: latest)")
    p.add_argument("--all", action="store_true", help="every artifact in the store")
    p.add_argument("--full", action="store_true",
                   help="re-hash every byte, whatever the stat cache says (bit rot)")
    p = verb("exec-node", cmd_exec_node,
             "compute one node of a run from its job spec (what executors run on workers)")
    p.add_argument("run", metavar="RUN", help="the run id")
    p.add_argument("node", metavar="NODE")
    p = verb("path", cmd_path, "print the folder of an output artifact")
    p.add_argument("run", metavar="RUN", help="a run id or 'latest'")
    p.add_argument("target", metavar="NODE[.OUTPUT]")
    return parser


# -- helpers ------------------------------------------------------------------------
def _store(args: argparse.Namespace) -> Any:
    from gptflow.store import Store

    return Store(args.store)


def _session(args: argparse.Namespace) -> Any:
    from gptflow.session import Session

    return Session.load(args.pipeline, args.overrides, args.store,
                        track=getattr(args, "track", ()),
                        executor=getattr(args, "executor", None),
                        executor_opts=getattr(args, "executor_opts", ()))


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# -- verbs --------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    session = _session(args)
    print(f"{args.pipeline}: ok ({len(session.pipeline.nodes)} nodes)")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, steps: Any = None) -> int:
    from rich.table import Table

    if steps is None:
        steps = _session(args).plan()
    table = Table(title="plan", title_justify="left")
    for col in ("node", "plugin", "action", "why", "fingerprint"):
        table.add_column(col)
    for s in steps:
        action = "[green]run[/]" if s.action == "run" else "[cyan]cached[/]"
        table.add_row(s.node.name, s.node.plugin, action, s.reason,
                      "(its inputs')" if s.pending else s.fingerprint[:12])
    _console().print(table)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from gptflow.distributed import follow, follower_rank
    from gptflow.records import RunStatus

    if args.jobs is not None and args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be at least 1")
    session = _session(args)
    if args.jobs is not None and session.pipeline.executor[0] != "local":
        raise InputError(f"--jobs is the local executor's; {session.pipeline.executor[0]} "
                         "schedules nodes by their resources")
    steps = session.plan(args.only, args.start, args.force)
    if args.dry_run:
        return cmd_plan(args, steps)
    rank = follower_rank()
    if rank:  # another process of a distributed run: rank 0 keeps the store and the record
        follow(steps, session.plugins, session.store, rank)
        return EXIT_OK
    record = session.run(steps, args.jobs, argv=["gptflow", *sys.argv[1:]])
    if record.status == RunStatus.OK and record.warnings:  # an observer failed: say so
        return EXIT_FAILED
    if record.status == RunStatus.INTERRUPTED:  # 130 for SIGINT, 143 for SIGTERM
        return 128 + signal.Signals[record.signal or "SIGINT"].value
    return EXIT_OK if record.status == RunStatus.OK else EXIT_FAILED


def cmd_exec_node(args: argparse.Namespace) -> int:
    from gptflow.executors.worker import exec_node

    return exec_node(_store(args), args.run, args.node)


def cmd_graph(args: argparse.Namespace) -> int:
    from gptflow.graph import draw_graph

    print(draw_graph(_session(args).pipeline, args.format))
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from gptflow.describe import node_type_tables, node_types_table, plugins_table
    from gptflow.manager import load_plugins

    plugins = load_plugins()
    console = _console()
    if not args.name:
        console.print(node_types_table(plugins))
        console.print(plugins_table(plugins))
        providers: dict[str, dict[str, str]] = {
            "executors": {n: r.provider for n, r in plugins.executors.items()},
            "trackers": {n: t.provider for n, t in plugins.trackers.items()}}
        for kind, found in providers.items():
            console.print(f"{kind}: " + (", ".join(f"{name} ({provider})" for name, provider
                                                   in sorted(found.items())) or "none"))
        for p in plugins.loaded:
            if p.imported_torch:
                console.print(f"[yellow]warning: plugin {p.name} imports torch when loaded "
                              f"({p.import_s:.1f} s), which slows every verb; import it "
                              "inside run()[/]")
        return EXIT_OK
    registered = plugins.node_types.get(args.name)
    if registered is None:
        raise InputError(f"no node type {args.name!r}; installed: "
                         f"{', '.join(sorted(plugins.node_types)) or 'none'}")
    nt = registered.node_type
    console.print(f"[bold]{nt.name}[/] (version {nt.version}, from {registered.provider})\n"
                  f"{nt.description}\n")
    for table in node_type_tables(nt):
        console.print(table)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from gptflow.describe import pipeline_schema
    from gptflow.manager import load_plugins

    print(json.dumps(pipeline_schema(load_plugins()), indent=2))
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gptflow.console import styled
    from gptflow.records import NodeStatus

    store = _store(args)
    table = Table(title=f"runs in {store.root}", title_justify="left")
    for col in ("run", "pipeline", "status", "started", "ran", "cached", "failed"):
        table.add_column(col)
    records, problems = store.runs()
    for r in records:
        counts = [r.count(s) for s in (NodeStatus.RAN, NodeStatus.CACHED, NodeStatus.FAILED)]
        table.add_row(r.run_id, r.pipeline.name, styled(r.status),
                      r.started[:19].replace("T", " "), *map(str, counts))
    _console().print(table)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from gptflow.console import reports, summary_table
    from gptflow.manager import load_plugins

    record = run_record(args.store, args.run)
    if args.json:
        print(json.dumps(record.to_json(), indent=2))
        return EXIT_OK
    console = _console()
    console.print(summary_table(record, load_plugins().headlines()))
    for name, node in record.nodes.items():
        if node.error:
            console.print(f"[red]{name}: {node.error}[/] (log: {node.log})")
        for note in node.warnings:
            console.print(f"[yellow]{name}: {note}[/]")
    for name, text in reports(record):
        console.print(f"\n[bold]{name}[/]\n{text}")
    loggers = Path(_store(args).run_dir(record.run_id)) / "loggers"
    if loggers.is_dir():
        console.print(f"\ntracker files (TensorBoard, W&B): {loggers}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from gptflow.store import CorruptArtifact

    store = _store(args)
    if args.all:
        fingerprints = sorted(p.name for p in (store.root / "artifacts").glob("*")
                              if p.is_dir())
    else:
        record = run_record(args.store, args.run)
        fingerprints = [n.fingerprint for n in record.nodes.values() if store.has(n.fingerprint)]
    corrupt = 0
    for fp in fingerprints:
        try:
            store.outputs(fp, full=args.full)
        except CorruptArtifact as e:
            corrupt += 1
            print(f"corrupt: {e}; {_repair(store, fp)}")
    depth = "every byte re-hashed" if args.full else "unchanged files trusted by stat"
    print(f"{len(fingerprints)} artifacts checked ({depth}): {corrupt} corrupt")
    return EXIT_FAILED if corrupt else EXIT_OK


def _repair(store: Any, fingerprint: str) -> str:
    """How to rebuild one artifact: its node, re-run with --force."""
    from gptflow.store import CorruptArtifact, CorruptRecord

    try:
        made = store.node_record(fingerprint)
        pipeline = store.load_run(made.run_id).pipeline.file
    except (CorruptArtifact, CorruptRecord):
        return f"remove {store.artifact_dir(fingerprint)} and re-run the node that made it"
    return f"repair: gptflow run {pipeline} --force {made.node}"


def cmd_path(args: argparse.Namespace) -> int:
    print(output_folder(args.store, args.run, args.target))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
