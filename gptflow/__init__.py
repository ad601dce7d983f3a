"""gptflow: declarative, cached, resumable pipelines for GPT models.

Plugin authors import from here only: ``hookimpl``, the node declaration types,
``Params``, the base of every params model, and ``expand_path``, which turns a
``PathRef`` value (a file, folder or glob) into the paths it names.
"""

import pluggy

from gptflow.errors import NodeError
from gptflow.nodes import Artifact, Context, Input, NodeType, ObserveOnly, Params, PathRef
from gptflow.sources import expand_path

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("gptflow")

__all__ = ["Artifact", "Context", "Input", "NodeError", "NodeType", "ObserveOnly", "Params",
           "PathRef", "expand_path", "hookimpl"]
