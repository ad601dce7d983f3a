"""A plugin with only a hook, that imports torch when it is loaded (a mistake)."""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401 (the mistake: at module level)

from gptflow import hookimpl


@hookimpl
def after_node_run(**kwargs: Any) -> None:
    pass
