"""mlflow: experiment tracking on the lifecycle hooks.

One parent MLflow run per ``gptflow run`` (the pipeline file as an artifact, its
sha256 as a tag), one child run per node, cached nodes included: the node's
params (flattened keys), final metrics, training curves step by step (Lightning's
``MLFlowLogger`` pointed at the child run, inside the node's process), tags
(plugin, version, fingerprint, status, duration, the run that computed it) and
its reports and plots as artifacts.

Turned on in a pipeline file or on the command line::

    tracking:
      mlflow: {uri: http://127.0.0.1:5000, experiment: my-experiment}

    gptflow run pipeline.yaml --track mlflow     # MLFLOW_TRACKING_URI is honoured

Options (``tracking.mlflow``): ``uri`` (default: ``$MLFLOW_TRACKING_URI``, else
MLflow's own default, ``sqlite:///mlflow.db`` in the working folder),
``experiment`` (default: the pipeline's name) and ``connect_timeout_s``: a server
that does not answer within it is skipped for the run, with a warning; tracking
never fails a node. Needs the ``tracking`` extra. MLflow is imported only by runs
that track.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import Field

from gptflow import Params, hookimpl

ARTIFACT_SUFFIXES = (".png", ".md", ".json", ".csv", ".txt")
ARTIFACT_MAX_BYTES = 1 << 20  # reports and plots, not weights
TAG = "gptflow."


class MlflowOptions(Params):
    uri: str | None = None
    """Tracking URI: an MLflow server (http://...) or a database (sqlite:///...);
    default: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)."""
    experiment: str | None = None
    """Experiment that holds the runs; default: the pipeline's name."""
    connect_timeout_s: float = Field(5.0, gt=0, le=600)
    """Seconds to wait for an http(s) tracking server before skipping it for the run."""


@dataclass
class Active:
    """A gptflow run being tracked: its client, parent run and child runs."""

    client: Any  # mlflow.MlflowClient
    experiment_id: str
    parent: str
    children: dict[str, str] = field(default_factory=dict)  # node -> MLflow run id


def tracking_uri(options: Mapping[str, Any]) -> str:
    import mlflow

    return str(options.get("uri") or mlflow.get_tracking_uri())


def unreachable(uri: str, options: Mapping[str, Any]) -> str | None:
    """Why an http(s) tracking server does not answer within the connect timeout, or
    None (it does, or the URI is a local database). MLflow's own client would retry
    for minutes."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https") or not url.hostname:
        return None
    timeout = float(options.get("connect_timeout_s", 5.0))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https"
                                                             else 80)), timeout).close()
    except OSError as e:
        return (f"MLflow server {uri} did not answer within {timeout:g} s "
                f"({e.strerror or type(e).__name__}): tracking skipped")
    return None


ACTIVE: dict[str, Active] = {}  # gptflow run id -> its MLflow runs (in the runner's process)


@hookimpl
def register_trackers(register: Any) -> None:
    register("mlflow", MlflowOptions)


@hookimpl
def before_pipeline_run(run_id: str, pipeline: str, path: str,
                        tracking: Mapping[str, Any]) -> None:
    if "mlflow" not in tracking:
        return
    import hashlib

    from mlflow import MlflowClient

    options = tracking["mlflow"]
    problem = unreachable(tracking_uri(options), options)
    if problem:  # the runner records it as the run's warning and goes on
        raise ConnectionError(problem)
    client = MlflowClient(tracking_uri(options))
    name = options.get("experiment") or pipeline
    found = client.get_experiment_by_name(name)
    experiment = found.experiment_id if found else client.create_experiment(name)
    parent = client.create_run(experiment, run_name=f"{pipeline} {run_id}", tags={
        f"{TAG}run_id": run_id, f"{TAG}pipeline": pipeline,
        f"{TAG}pipeline_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
    }).info.run_id
    client.log_artifact(parent, path)
    ACTIVE[run_id] = Active(client, experiment, parent)


@hookimpl
def before_node_run(run_id: str, node: str, plugin: str, fingerprint: str) -> None:
    active = ACTIVE.get(run_id)
    if active is not None:
        _child(active, run_id, node, {f"{TAG}plugin": plugin, f"{TAG}fingerprint": fingerprint,
                                      f"{TAG}status": "running"})


@hookimpl
def after_node_run(run_id: str, node: str, status: str, metrics: Mapping[str, Any],
                   outputs: Mapping[str, str], record: Mapping[str, Any]) -> None:
    active = ACTIVE.get(run_id)
    if active is None:
        return
    from mlflow.entities import Metric, Param, RunTag

    child = _child(active, run_id, node, {})
    manifest = record.get("manifest", {})
    params = {**dict(flatten(manifest.get("params", {}))),
              **dict(flatten(manifest.get("observed", {})))}
    tags = {f"{TAG}plugin": record["plugin"], f"{TAG}version": record["version"],
            f"{TAG}fingerprint": record["fingerprint"], f"{TAG}status": status,
            f"{TAG}duration_s": f"{record['duration_s']:.3f}",
            f"{TAG}computed_by": record["run_id"], f"{TAG}cached": str(status == "cached").lower()}
    numbers = [Metric(k, float(v), 0, 0) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)]
    active.client.log_batch(child, metrics=numbers,
                            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                            tags=[RunTag(k, v) for k, v in tags.items()])
    for name, folder in outputs.items():
        for file in reports(Path(folder)):
            active.client.log_artifact(child, str(file), artifact_path=name)
    active.client.set_terminated(child, "FINISHED")


@hookimpl
def on_node_error(run_id: str, node: str, error: str) -> None:
    active = ACTIVE.get(run_id)
    if active is not None:
        child = _child(active, run_id, node, {})
        active.client.set_tag(child, f"{TAG}status", "failed")
        active.client.set_tag(child, f"{TAG}error", error[:5000])
        active.client.set_terminated(child, "FAILED")


@hookimpl
def after_pipeline_run(run_id: str, status: str) -> None:
    active = ACTIVE.pop(run_id, None)
    if active is not None:
        active.client.set_tag(active.parent, f"{TAG}status", status)
        active.client.set_terminated(active.parent, "FINISHED" if status == "ok" else "FAILED")


@hookimpl
def register_training_callbacks(node: str, run_id: str, tracking: Mapping[str, Any],
                                register: Any) -> None:
    if "mlflow" in tracking:
        register(step_curves(tracking_uri(tracking["mlflow"]), tracking["mlflow"], run_id, node))


def _child(active: Active, run_id: str, node: str, tags: dict[str, str]) -> str:
    if node not in active.children:
        active.children[node] = active.client.create_run(
            active.experiment_id, run_name=node, tags={
                "mlflow.parentRunId": active.parent, f"{TAG}run_id": run_id,
                f"{TAG}node": node, **tags}).info.run_id
    return active.children[node]


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested params as dotted keys: {"trainer": {"max_steps": 3}} -> trainer.max_steps."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), value


def reports(folder: Path) -> list[Path]:
    """The small human-readable files of an output: plots, reports, tables."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name != "artifact.json"
                  and f.suffix in ARTIFACT_SUFFIXES and f.stat().st_size <= ARTIFACT_MAX_BYTES)


def step_curves(uri: str, options: Mapping[str, Any], run_id: str, node: str) -> Any:
    """A callback that adds Lightning's MLFlowLogger, pointed at the node's child run,
    to the trainer: the training curves land in the child step by step. A server
    that cannot be reached leaves the node training without it."""
    from lightning.pytorch.callbacks import Callback

    class StepCurves(Callback):
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            from lightning.pytorch.loggers import MLFlowLogger
            from mlflow import MlflowClient

            if not trainer.is_global_zero:
                return
            problem = unreachable(uri, options)
            try:
                child = None if problem else _find_child(MlflowClient(uri), run_id, node)
            except Exception as e:  # tracking never fails a node
                problem = f"MLflow: {type(e).__name__}: {e}".splitlines()[0]
            if problem:
                logging.getLogger(__name__).warning("%s (training curves)", problem)
            elif child is not None:
                trainer.loggers = [*trainer.loggers, MLFlowLogger(tracking_uri=uri, run_id=child)]

    return StepCurves()


def _find_child(client: Any, run_id: str, node: str) -> str | None:
    """The child run the runner's process made for this node (found by its tags, so
    that parallel worker processes find it too)."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{TAG}run_id` = '{run_id}' and tags.`{TAG}node` = '{node}'",
        max_results=1)
    return str(runs[0].info.run_id) if runs else None

