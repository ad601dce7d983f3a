"""One way to run a pipeline — load, plan, run — used alike by the CLI, the
benchmarks, the tests and the pytest fixtures (kedro's ``KedroSession.run``).

Example::

    from gptflow.session import run_pipeline

    record = run_pipeline("pipelines/quickstart.yaml", ["vars.seed=3"], store=".gptflow")
    print(record.status, record.nodes["base"].metrics["val_loss"])
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gptflow.console import Display, private_console
from gptflow.dag import Pipeline
from gptflow.errors import InputError, Problem
from gptflow.manager import Plugins, load_plugins
from gptflow.pipeline import load_pipeline
from gptflow.plan import Step, make_plan
from gptflow.records import RunRecord
from gptflow.runner import Runner
from gptflow.store import Store


@dataclass
class Session:
    """A loaded, validated pipeline, the plugins it was checked against, its store."""

    pipeline: Pipeline
    plugins: Plugins
    store: Store

    @classmethod
    def load(cls, path: str | Path, overrides: Iterable[str] = (),
             store: str | Path | Store | None = None, plugins: Plugins | None = None,
             track: Iterable[str] = (), executor: str | None = None,
             executor_opts: Iterable[str] = ()) -> Session:
        """Validate ``path`` with ``overrides``, the trackers in ``track`` turned on
        and the executor chosen (raises InputError, nothing written)."""
        plugins = plugins or load_plugins()
        pipeline = load_pipeline(path, plugins, overrides, track, executor, executor_opts)
        store = store if isinstance(store, Store) else Store(store)
        name, options = pipeline.executor
        registered = plugins.executors[name]
        problem = registered.factory.problem(registered.options.model_validate(options), store,
                                             pipeline)
        if problem:
            raise InputError([Problem(f"executor {name}: {problem}", str(path))])
        return cls(pipeline, plugins, store)

    def plan(self, only: Collection[str] = (), start: Collection[str] = (),
             force: Collection[str] | None = None) -> list[Step]:
        return make_plan(self.pipeline, self.store, only, start, force)

    def run(self, steps: list[Step] | None = None, jobs: int | None = None,
            display: Display | None = None, argv: list[str] | None = None) -> RunRecord:
        """Run ``steps`` (default: the whole plan); returns the run record."""
        steps = self.plan() if steps is None else steps
        with _display(display) as shown:
            return Runner(self.pipeline, self.plugins, self.store, shown, jobs).run(steps, argv)


def run_pipeline(path: str | Path, overrides: Iterable[str] = (),
                 store: str | Path | Store | None = None, only: Collection[str] = (),
                 force: Collection[str] | None = None, jobs: int | None = None,
                 plugins: Plugins | None = None, display: Display | None = None) -> RunRecord:
    """Load, plan and run a pipeline file; returns the run record."""
    session = Session.load(path, overrides, store, plugins)
    return session.run(session.plan(only=only, force=force), jobs, display)


@contextmanager
def _display(display: Display | None) -> Iterator[Display]:
    if display is not None:
        yield display
        return
    with private_console() as console, Display(console) as own:
        yield own
