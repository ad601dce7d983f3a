"""gptflow: declarative, cached, resumable pipelines for GPT models.

Plugin authors import from here only: ``hookimpl``, the node declaration types
and ``Params``, the base of every params model.
"""

import pluggy

from gptflow.errors import NodeError
from gptflow.nodes import Artifact, Context, Input, NodeType, ObserveOnly, Params, PathRef

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("gptflow")

__all__ = ["Artifact", "Context", "Input", "NodeError", "NodeType", "ObserveOnly", "Params",
           "PathRef", "hookimpl"]
