"""A YAML file read with the line and column of every key and value, so that
every later stage can point at where a problem is (``FILE:LINE:COL``).

Runs no code and builds no objects: safe loading, with ``<<`` merge keys.
"""

from __future__ import annotations

from typing import Any

import yaml

from gptflow.errors import InputError, Problem

Key = tuple[str | int, ...]
Mark = tuple[str, int | None, int | None]
MAX_DEPTH = 64  # far beyond any pipeline; a recursive alias is infinitely deep
MAX_VALUES = 100_000  # far beyond any pipeline; nested aliases can expand to billions


class MarkedYAML:
    """Holds the file's marks so every stage can point at a line and column."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.marks: dict[Key, Mark] = {}  # of values
        self.key_marks: dict[Key, Mark] = {}  # of mapping keys
        self.problems: list[Problem] = []
        self._values = 0
        self._scalars = yaml.SafeLoader("")  # its constructor turns scalar nodes into values

    def error(self, key: Key, message: str, at_key: bool = False) -> None:
        """Report a problem at the value of ``key`` (or at the key itself)."""
        if at_key and key in self.key_marks:
            self.problems.append(Problem(message, *self.key_marks[key]))
            return
        for i in range(len(key), -1, -1):  # the nearest marked ancestor
            if key[:i] in self.marks:
                file, line, col = self.marks[key[:i]]
                break
        else:
            file, line, col = self.file, None, None
        self.problems.append(Problem(message, file, line, col))

    def compose(self, text: str) -> Any:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
            raise InputError([Problem(f"invalid YAML: {e.problem or e.context}",
                                      self.file, line, col)]) from None
        except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, ...)
            before = text[: e.position]
            raise InputError([Problem(
                f"invalid YAML: character {e.character!r} is not allowed", self.file,
                before.count("\n") + 1, len(before) - before.rfind("\n"))]) from None
        except RecursionError:
            raise InputError([Problem(f"invalid YAML: nested more than {MAX_DEPTH} levels "
                                      "deep", self.file)]) from None
        if root is None:
            raise InputError([Problem("the pipeline file is empty", self.file, 1, 1)])
        return self._value(root, ())

    def load(self, text: str) -> Any:
        """One value written in YAML outside the file (a ``--set`` value), under the
        same depth and size limits; text that is not YAML stays the string it is."""
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except (yaml.YAMLError, RecursionError):
            return text
        self._values = 0
        return None if node is None else self._value(node, ())

    def _value(self, node: yaml.Node, key: Key) -> Any:
        mark = (self.file, node.start_mark.line + 1, node.start_mark.column + 1)
        self._values += 1
        if len(key) > MAX_DEPTH or self._values > MAX_VALUES:
            what = (f"nested more than {MAX_DEPTH} levels deep (a recursive alias?)"
                    if len(key) > MAX_DEPTH else
                    f"expands to more than {MAX_VALUES} values (nested aliases?)")
            raise InputError([Problem(f"invalid YAML: {what}", *mark)])
        self.marks[key] = mark
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            merged: list[Any] = []
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` (explicit keys win)
                    merged += [self._value(m, key) for m in
                               (v.value if isinstance(v, yaml.SequenceNode) else [v])]
                    continue
                name = str(self._scalar(k))
                self.key_marks[(*key, name)] = (self.file, k.start_mark.line + 1,
                                                k.start_mark.column + 1)
                if name in out:
                    self.error((*key, name), f"duplicate key {name!r}", at_key=True)
                out[name] = self._value(v, (*key, name))
            for extra in merged:
                if not isinstance(extra, dict):
                    self.error(key, "a merge key (<<) takes a mapping")
                    continue
                for name, value in extra.items():
                    out.setdefault(name, value)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._value(v, (*key, i)) for i, v in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        return self._scalars.construct_object(node, deep=True)
