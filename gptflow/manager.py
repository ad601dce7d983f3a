"""The plugin manager: which plugins are loaded, and what they registered.

Built-ins come from an explicit tuple of module names and use the same
``@hookimpl`` a third party uses. Third parties come from the entry-point group
``gptflow`` (off with ``GPTFLOW_DISABLE_PLUGIN_AUTOLOAD=1``; one at a time with
``GPTFLOW_DISABLE_PLUGINS=name1,name2``), and extra plugin
modules from ``GPTFLOW_PLUGINS=mod1,mod2`` (handy for tests and for parallel
workers, which rebuild the manager from names). ``GPTFLOW_TRACE_HOOKS=1``
prints every hook call to stderr.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel

import gptflow
from gptflow import hookspecs
from gptflow.errors import did_you_mean, one_line
from gptflow.nodes import NodeType

BUILTIN_PLUGINS = (
    "gptflow_load",
    "gptflow_tokenize",
    "gptflow_pretrain",
    "gptflow_finetune",
    "gptflow_lora",
    "gptflow_merge",
    "gptflow_quantize",
    "gptflow_distill",
    "gptflow_synth",
    "gptflow_evaluate",
    "gptflow_mlflow",
    "gptflow.executors",
)


class PluginError(Exception):
    """A plugin that cannot be loaded as written: the message names it and the hook."""


@dataclass(frozen=True)
class Registered:
    """A node type and the distribution that provided it."""

    node_type: NodeType
    provider: str
    plugin: str = ""  # the plugin (module or entry point name) that registered it


@dataclass(frozen=True)
class Loaded:
    """A plugin as it was loaded: how long its import took, and whether that
    import pulled in torch (which makes every verb, validate too, seconds slower)."""

    name: str
    plugin: object
    import_s: float
    imported_torch: bool


@dataclass(frozen=True)
class Tracker:
    """An experiment tracker: its name in ``tracking:``, its options, its provider."""

    name: str
    options: type[BaseModel]
    provider: str


@dataclass(frozen=True)
class RegisteredExecutor:
    """An executor class, its options model, its provider."""

    name: str
    factory: Any  # a gptflow.executors.Executor subclass
    options: type[BaseModel]
    provider: str


EXECUTOR_METHODS = ("submit", "next", "cancel", "close")


class Plugins:
    """The typed facade the runner calls: node types, trackers, executors, lifecycle hooks.

    With no plugins at all it still works: every hook is a no-op.
    """

    def __init__(self, pm: pluggy.PluginManager, extra_modules: tuple[str, ...] = (),
                 providers: Mapping[int, str] | None = None,
                 loaded: Iterable[Loaded] = ()) -> None:
        self.pm = pm
        self.extra_modules = extra_modules  # rebuilt by name in worker processes
        self.providers = dict(providers or {})  # id(plugin) -> its distribution
        self.loaded = list(loaded)
        self.node_types: dict[str, Registered] = {}
        self.trackers: dict[str, Tracker] = {}
        self.executors: dict[str, RegisteredExecutor] = {}
        self.hook_errors: list[str] = []  # observers that raised, plugin and hook named
        self._registration("register_node_types", self._register)
        self._registration("register_trackers", self._register_tracker)
        self._registration("register_executors", self._register_executor)

    def _registration(self, hook: str, register: Callable[..., None]) -> None:
        """Call a registration hook one plugin at a time, through pluggy (so tracing
        sees it), to know which distribution registered what."""
        for impl, only in self._per_plugin(hook):
            provider = self.provider(impl.plugin)
            try:
                only(register=functools.partial(register, provider=provider,
                                                plugin=impl.plugin_name))
            except PluginError:
                raise
            except Exception as e:
                name = _label(impl.plugin_name, impl.plugin)
                raise PluginError(f"plugin {name} ({provider}): hook {hook} raised "
                                  f"{one_line(e)}") from e

    def _per_plugin(self, hook: str) -> Iterator[tuple[Any, Callable[..., Any]]]:
        """(hook implementation, a caller of that plugin's implementation alone)."""
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        for impl in impls:
            yield impl, self.pm.subset_hook_caller(hook, [i.plugin for i in impls
                                                          if i is not impl])

    def _register(self, node_type: NodeType, provider: str, plugin: str) -> None:
        if not isinstance(node_type, NodeType):
            raise PluginError(f"{provider}: register() takes a gptflow.NodeType, "
                              f"got {node_type!r}")
        taken = self.node_types.get(node_type.name)
        if taken:
            raise PluginError(f"node type {node_type.name!r} is registered twice: "
                              f"by {taken.provider} and by {provider}")
        self.node_types[node_type.name] = Registered(node_type, provider, plugin)

    def _register_tracker(self, name: str, options: type[BaseModel], provider: str,
                          plugin: str) -> None:
        _check_named(self.trackers, "tracker", name, options, provider)
        self.trackers[name] = Tracker(name, options, provider)

    def _register_executor(self, factory: Any, provider: str, plugin: str) -> None:
        name, options = getattr(factory, "name", None), getattr(factory, "options", None)
        missing = [m for m in EXECUTOR_METHODS if not callable(getattr(factory, m, None))]
        if not isinstance(factory, type) or not isinstance(name, str) or missing:
            raise PluginError(f"{provider}: register() takes a gptflow.executors.Executor "
                              f"subclass with a name, got {factory!r}"
                              + (f" (no {', '.join(missing)})" if missing else ""))
        model = _check_named(self.executors, "executor", name, options, provider)
        self.executors[name] = RegisteredExecutor(name, factory, model, provider)

    def versions(self, node_type: str) -> dict[str, str]:
        """What a worker must have to compute a node as the driver would: the
        versions of gptflow, of the node type and of the distribution providing it."""
        registered = self.node_types[node_type]
        try:
            dist = importlib.metadata.version(registered.provider)
        except (importlib.metadata.PackageNotFoundError, ValueError):
            dist = ""  # a plugin module by name (GPTFLOW_PLUGINS): its node type version says
        return {"gptflow": gptflow.__version__, "provider": registered.provider,
                "provider_version": dist, "node_type": registered.node_type.version}

    def provider(self, plugin: object) -> str:
        return self.providers.get(id(plugin), _module_provider(plugin))

    def hooks(self, plugin: object) -> list[str]:
        return sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])

    def headlines(self) -> dict[str, tuple[str, ...]]:
        """Node type -> the metrics its summary shows."""
        return {name: r.node_type.headline for name, r in self.node_types.items()}

    def training_callbacks(self, node: str, run_id: str, tracking: Mapping[str, Any],
                           log_dir: str) -> list[Any]:
        callbacks: list[Any] = []
        self.pm.hook.register_training_callbacks(node=node, run_id=run_id, tracking=tracking,
                                                 log_dir=log_dir, register=callbacks.append)
        return callbacks

    def before_pipeline_run(self, run_id: str, pipeline: str, nodes: list[str], path: str,
                            tracking: Mapping[str, Any]) -> None:
        self._observe("before_pipeline_run", run_id=run_id, pipeline=pipeline, nodes=nodes,
                      path=path, tracking=tracking)

    def before_node_run(self, run_id: str, node: str, plugin: str, fingerprint: str) -> None:
        self._observe("before_node_run", run_id=run_id, node=node, plugin=plugin,
                      fingerprint=fingerprint)

    def after_node_run(self, run_id: str, node: str, status: str, metrics: Mapping[str, Any],
                       outputs: Mapping[str, str], record: Mapping[str, Any]) -> None:
        self._observe("after_node_run", run_id=run_id, node=node, status=status,
                      metrics=metrics, outputs=outputs, record=record)

    def on_node_error(self, run_id: str, node: str, error: str, log_path: str) -> None:
        self._observe("on_node_error", run_id=run_id, node=node, error=error, log_path=log_path)

    def after_pipeline_run(self, run_id: str, status: str, record: Mapping[str, Any]) -> None:
        self._observe("after_pipeline_run", run_id=run_id, status=status, record=record)

    def _observe(self, hook: str, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin, one at a time: an observer that raises
        (a tracker whose server is down) is reported with its plugin and hook, and the
        other observers and the pipeline go on."""
        for impl, only in self._per_plugin(hook):
            try:
                only(**kwargs)
            except Exception as e:
                self.hook_errors.append(f"plugin {_label(impl.plugin_name, impl.plugin)}: hook "
                                        f"{hook} raised "
                                        f"{one_line(e)}")


def _check_named(taken: Mapping[str, Any], kind: str, name: str, options: Any,
                 provider: str) -> type[BaseModel]:
    """A tracker's or executor's options (a params model), its name not yet taken."""
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise PluginError(f"{provider}: {kind} {name!r}: options must be a params model "
                          f"(a gptflow.Params subclass), got {options!r}")
    if name in taken:
        raise PluginError(f"{kind} {name!r} is registered twice: by {taken[name].provider} "
                          f"and by {provider}")
    return options


def _module_provider(plugin: object) -> str:
    module = getattr(plugin, "__name__", None) or type(plugin).__module__
    return "gptflow" if module in BUILTIN_PLUGINS else module


def load_plugins(extra: Iterable[object] = (), builtins: bool = True) -> Plugins:
    """Build a fresh manager: built-ins, entry points, GPTFLOW_PLUGINS, then ``extra``."""
    pm = pluggy.PluginManager("gptflow")
    pm.add_hookspecs(hookspecs)
    for name in os.environ.get("GPTFLOW_DISABLE_PLUGINS", "").split(","):
        if name.strip():  # pytest's -p no:NAME: entry-point, module or built-in name
            pm.set_blocked(name.strip())
    loaded: list[Loaded] = []

    def timed(name: str, load: Callable[[], object]) -> object:
        torch_before, started = "torch" in sys.modules, time.perf_counter()
        plugin = load()
        loaded.append(Loaded(name, plugin, time.perf_counter() - started,
                             not torch_before and "torch" in sys.modules))
        return plugin

    if builtins:
        for name in BUILTIN_PLUGINS:
            pm.register(timed(name, functools.partial(importlib.import_module, name)), name)
    providers = {}
    if os.environ.get("GPTFLOW_DISABLE_PLUGIN_AUTOLOAD") != "1":
        for ep, dist in _entry_points():
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            plugin = timed(ep.name, functools.partial(_load, ep, dist))
            if pm.register(plugin, ep.name):
                providers[id(plugin)] = dist
    modules = tuple(m.strip() for m in os.environ.get("GPTFLOW_PLUGINS", "").split(",")
                    if m.strip())
    for name in modules:
        if not pm.is_blocked(name) and pm.get_plugin(name) is None:
            module = timed(name, functools.partial(_import, name))
            if not pm.is_registered(module):  # also an entry point's module: once is enough
                pm.register(module, name)
    for plugin in extra:
        pm.register(plugin)
    _check_hooks(pm)
    if os.environ.get("GPTFLOW_TRACE_HOOKS") == "1":
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return Plugins(pm, modules, providers, [p for p in loaded if pm.is_registered(p.plugin)])


def _import(name: str) -> object:
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise PluginError(f"plugin module {name} (GPTFLOW_PLUGINS) cannot be imported: "
                          f"{one_line(e)}") from None


def _entry_points() -> list[tuple[Any, str]]:
    """The ``gptflow`` entry points with their distributions; two distributions
    claiming one name is an error naming both (pluggy would keep one silently)."""
    found: dict[str, tuple[Any, str]] = {}
    for ep in importlib.metadata.entry_points(group="gptflow"):
        dist = ep.dist.name if ep.dist else "?"
        if ep.name in found and found[ep.name][1] != dist:
            raise PluginError(f"plugin name {ep.name!r} is claimed by two distributions, "
                              f"{found[ep.name][1]} and {dist}; uninstall one, or "
                              f"GPTFLOW_DISABLE_PLUGINS={ep.name} to load neither")
        found[ep.name] = (ep, dist)
    return list(found.values())


def _load(ep: Any, dist: str) -> object:
    try:
        plugin: object = ep.load()
    except Exception as e:
        raise PluginError(f"plugin {ep.name} (distribution {dist}, entry point {ep.value}) "
                          f"cannot be imported: {one_line(e)}; GPTFLOW_DISABLE_PLUGINS="
                          f"{ep.name} skips it") from None
    return plugin


def _check_hooks(pm: pluggy.PluginManager) -> None:
    """A misspelled hook, or a hook function without @hookimpl, is an error naming
    the plugin (pluggy says the first unclearly and cannot see the second)."""
    known = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "gptflow_spec")]
    for hook in [h for h in vars(pm.hook) if not h.startswith("_")]:
        caller = getattr(pm.hook, hook)
        if not caller.has_spec() and caller.get_hookimpls():
            impl = caller.get_hookimpls()[0]
            raise PluginError(f"plugin {_label(impl.plugin_name, impl.plugin)}: @hookimpl "
                              f"{hook!r} is no gptflow hook{did_you_mean(hook, known)}")
    for name, plugin in pm.list_name_plugin():
        for hook in known:
            function = getattr(plugin, hook, None)
            marked = any(i.plugin is plugin for i in getattr(pm.hook, hook).get_hookimpls())
            if callable(function) and not marked:
                raise PluginError(f"plugin {_label(name, plugin)}: {hook}() is not marked "
                                  "@hookimpl, so "
                                  "gptflow would never call it (from gptflow import hookimpl)")


def _label(name: str, plugin: object) -> str:
    """A plugin's name; an object registered without one, by its class."""
    return type(plugin).__name__ if name.isdigit() else name
