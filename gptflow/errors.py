"""Errors that reach the user: one line per problem, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130  # of every gptflow verb


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input, with where it is when known."""

    message: str
    file: str | None = None
    line: int | None = None
    col: int | None = None

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.file, self.line, self.col) if p is not None)
        return f"{where}: error: {self.message}" if where else f"error: {self.message}"


class InputError(Exception):
    """Bad input from the user (exit code 2): the store is left untouched."""

    def __init__(self, problems: list[Problem] | str) -> None:
        self.problems = [Problem(problems)] if isinstance(problems, str) else problems
        super().__init__("\n".join(str(p) for p in self.problems))


class NodeError(Exception):
    """Raised by a node's run() for a failure worth one clear line (no traceback)."""


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (a
    NodeError's message alone: it was written for the user)."""
    text = str(e).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(e, NodeError) else f"{type(e).__name__}: {message}"


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
