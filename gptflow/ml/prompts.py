"""How a tuned model is prompted: the Natural Instructions layout (definition,
k demonstrations, the input, "Output:"), optionally sent as a user message
through the model's chat template, stored with the model so that evaluate,
generate-synthetic-data and merges prompt it the way it was trained."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gptflow.ml.tasks import Task

if TYPE_CHECKING:
    from gptflow.ml.tokenizer import Tokenizer

DEFAULT_TEMPLATE = ("Definition: {definition}\n\n{examples}"
                    "Now complete the following example -\nInput: {input}\nOutput:")
EXAMPLE_TEMPLATE = "Positive Example {n} -\nInput: {input}\nOutput: {output}\n\n"


@dataclass(frozen=True)
class PromptFormat:
    """Saved as ``prompt`` in a model's config.json or an adapter's adapter_config.json."""

    template: str = DEFAULT_TEMPLATE  # with {definition}, {examples} and {input}
    k_examples: int = 0  # positive examples (demonstrations) shown before the input
    reverse: bool = False  # tuned backwards: writes an input given its output
    chat: bool = False  # the prompt is a user message in the model's chat template

    def render(self, task: Task, text: str, k_examples: int | None = None,
               tokenizer: Tokenizer | None = None) -> str:
        """The prompt for ``text``; the target follows ``answer_prefix``. A chat
        prompt needs the model's tokenizer, which holds its template."""
        k = self.k_examples if k_examples is None else k_examples
        examples = "".join(EXAMPLE_TEMPLATE.format(n=n + 1, input=i, output=o)
                           for n, (i, o) in enumerate(task.examples[:k]))
        body = self.template.format(definition=task.definition, examples=examples, input=text)
        if not self.chat:
            return body
        if tokenizer is None:
            raise ValueError("a chat prompt needs the model's tokenizer")
        return tokenizer.render_chat([{"role": "user", "content": body}])

    @property
    def answer_prefix(self) -> str:
        """What separates prompt and answer: a space after "Output:", nothing after
        the chat template's assistant header."""
        return "" if self.chat else " "

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> PromptFormat:
        """The format stored in an artifact's config (the default when none is)."""
        stored = config.get("prompt") or {}
        unknown = set(stored) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown prompt field(s): {', '.join(sorted(unknown))}")
        return cls(**stored)
