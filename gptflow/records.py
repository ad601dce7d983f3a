"""The records the store keeps, as types with a schema version, validated when
read and when written: ``runs/<id>/run.json`` (a run and the state of each of
its nodes) and ``artifacts/<fingerprint>/node.json`` (what made an artifact).

Their JSON is the contract that ``gptflow show --json``, scripts and CI read.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RUN_SCHEMA = 1
NODE_SCHEMA = 1


class NodeStatus(str, Enum):
    """Where a node of a run stands."""

    PENDING = "pending"
    RUNNING = "running"
    RAN = "ran"
    CACHED = "cached"
    FAILED = "failed"
    SKIPPED = "skipped"  # an upstream node failed
    INTERRUPTED = "interrupted"

    @property
    def done(self) -> bool:
        """Its outputs exist: downstream nodes may start."""
        return self in (NodeStatus.RAN, NodeStatus.CACHED)

    @property
    def blocks(self) -> bool:
        """It ended without outputs: downstream nodes are skipped."""
        return self in (NodeStatus.FAILED, NodeStatus.SKIPPED, NodeStatus.INTERRUPTED)


class RunStatus(str, Enum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    KILLED = "killed"  # said on load of a running record whose process is gone


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class NodeEntry(Record):
    """One node of a run."""

    plugin: str
    fingerprint: str
    reason: str  # why it runs, or why it is cached
    log: str  # its log file
    status: NodeStatus = NodeStatus.PENDING
    outputs: dict[str, str] = Field(default_factory=dict)  # output name -> artifact folder
    metrics: dict[str, Any] = Field(default_factory=dict)
    duration_s: float | None = None
    peak_mem_bytes: int | None = None
    error: str | None = None  # one line, when it failed
    warnings: list[str] = Field(default_factory=list)  # what it told the user (context.warn)


class PipelineInfo(Record):
    name: str
    file: str
    sha256: str
    overrides: list[str] = Field(default_factory=list)


class Owner(Record):
    """The process that runs a run, as :mod:`gptflow.liveness` identifies it."""

    host: str
    boot_id: str
    pid_ns: str  # the PID namespace (containers): a pid means nothing outside it
    pid: int
    start: int | None  # the process's start time, clock ticks after boot


class RunRecord(Record):
    """``runs/<id>/run.json``."""

    schema_version: int = Field(RUN_SCHEMA, alias="schema")
    run_id: str
    status: RunStatus = RunStatus.RUNNING
    pid: int
    owner: Owner | None = None  # None in records written before owners were kept
    command: list[str] = Field(default_factory=list)
    started: str
    ended: str | None = None
    pipeline: PipelineInfo
    nodes: dict[str, NodeEntry]
    warnings: list[str] = Field(default_factory=list)  # observer hooks that raised
    signal: str | None = None  # what interrupted it: SIGINT, SIGTERM

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def count(self, status: NodeStatus) -> int:
        return sum(n.status == status for n in self.nodes.values())


class NodeRecord(Record):
    """``artifacts/<fingerprint>/node.json``: what made an artifact, and its metrics."""

    schema_version: int = Field(NODE_SCHEMA, alias="schema")
    node: str
    plugin: str
    version: str
    run_id: str
    fingerprint: str
    manifest: dict[str, Any]  # everything the fingerprint is made of (see plan.manifest)
    metrics: dict[str, Any]
    duration_s: float
    created: str
    outputs: list[str] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
