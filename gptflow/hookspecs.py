"""The hooks of gptflow: the public API that plugins implement.

Two families, named by one rule:

* registration hooks, ``register_*(..., register)``: the host passes a
  ``register`` callback, so it can reject duplicates and remember which
  distribution provided what;
* lifecycle hooks, kedro's grammar, ``before_*`` / ``after_*`` / ``on_*``:
  observers of a run (loggers, trackers, notifiers). Their return values are
  ignored.

Plugin authors implement them with ``from gptflow import hookimpl``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from gptflow.nodes import NodeType

__all__ = ["after_node_run", "after_pipeline_run", "before_node_run", "before_pipeline_run",
           "on_node_error", "register_executors", "register_node_types", "register_trackers",
           "register_training_callbacks"]

_hookspec = pluggy.HookspecMarker("gptflow")  # private: plugins use gptflow.hookimpl


@_hookspec
def register_node_types(register: Callable[[NodeType], None]) -> None:
    """Declare the node types a plugin provides.

    Args:
        register: call it once per :class:`gptflow.NodeType`; a name that is
            already taken is refused with an error naming both providers.

    Returns:
        Nothing. All implementations are called.
    """


@_hookspec
def register_trackers(register: Callable[[str, type[BaseModel]], None]) -> None:
    """Declare the experiment trackers a plugin provides (``tracking:`` in a pipeline).

    Args:
        register: call it as ``register(name, options_model)``; ``tracking: {name:
            {...}}`` in a pipeline file (or ``gptflow run --track name``) is then
            validated against ``options_model`` (a :class:`gptflow.Params`).

    Returns:
        Nothing. All implementations are called.
    """


@_hookspec
def register_executors(register: Callable[[Any], None]) -> None:
    """Declare the executors a plugin provides (``gptflow run --executor NAME``).

    Args:
        register: call it with each executor class, a subclass of
            :class:`gptflow.executors.Executor` with a ``name`` and an ``options``
            params model (the ``executor: {NAME: {...}}`` block, ``--executor-opt``).

    Returns:
        Nothing. All implementations are called.
    """


@_hookspec
def register_training_callbacks(node: str, run_id: str, tracking: Mapping[str, Any],
                                log_dir: str, register: Callable[[Any], None]) -> None:
    """Add Lightning callbacks to every training node.

    Args:
        node: the pipeline node about to train.
        run_id: the id of the run it belongs to.
        tracking: the run's trackers, name -> validated options as JSON.
        log_dir: a folder under the run that outlives the node (tracker files).
        register: call it with each ``lightning.Callback`` instance to add.

    Returns:
        Nothing. All implementations are called, inside the node's process.
    """


@_hookspec
def before_pipeline_run(run_id: str, pipeline: str, nodes: list[str], path: str,
                        tracking: Mapping[str, Any]) -> None:
    """Called once before the first node of a run starts.

    Args:
        run_id: the id of the run (``gptflow show RUN``).
        pipeline: the pipeline's name.
        nodes: the nodes of the pipeline in execution order.
        path: the pipeline file.
        tracking: the run's trackers, name -> validated options as JSON.

    Returns:
        Nothing. All implementations are called.
    """


@_hookspec
def before_node_run(run_id: str, node: str, plugin: str, fingerprint: str) -> None:
    """Called before a node that is not cached starts running.

    Args:
        run_id: the id of the run.
        node: the pipeline node.
        plugin: its node type.
        fingerprint: its cache key.

    Returns:
        Nothing. All implementations are called.
    """


@_hookspec
def after_node_run(run_id: str, node: str, status: str, metrics: Mapping[str, Any],
                   outputs: Mapping[str, str], record: Mapping[str, Any]) -> None:
    """Called after a node finished, ran or cached.

    Args:
        run_id: the id of the run.
        node: the pipeline node.
        status: ``ran`` or ``cached``.
        metrics: the node's metrics (names as in DESIGN.md section 8).
        outputs: output name -> artifact directory.
        record: what made the artifact (``node.json``: plugin, version, fingerprint,
            the run that computed it, params, duration).

    Returns:
        Nothing. All implementations are called.
    """


@_hookspec
def on_node_error(run_id: str, node: str, error: str, log_path: str) -> None:
    """Called when a node fails.

    Args:
        run_id: the id of the run.
        node: the pipeline node.
        error: one line saying what went wrong.
        log_path: the node's log file, with the full traceback.

    Returns:
        Nothing. All implementations are called.
    """


@_hookspec
def after_pipeline_run(run_id: str, status: str, record: Mapping[str, Any]) -> None:
    """Called once when a run ends, whatever its outcome.

    Args:
        run_id: the id of the run.
        status: ``ok``, ``failed`` or ``interrupted``.
        record: the run record as written to ``run.json``.

    Returns:
        Nothing. All implementations are called.
    """
