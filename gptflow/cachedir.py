"""Where this machine keeps things for itself, outside any store: file hashes
(per host), fetched data. One place, so both agree on it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GPTFLOW_CACHE_DIR, else $XDG_CACHE_HOME/gptflow, else ~/.cache/gptflow."""
    if os.environ.get("GPTFLOW_CACHE_DIR"):
        return Path(os.environ["GPTFLOW_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptflow"
