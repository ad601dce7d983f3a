"""Built-in corpora that need no download (pure Python, no torch).

* ``builtin:python-docs``: the docstrings of the running Python's standard
  library, read from its source files with ``ast`` (real English, ~1.5 MB).
* ``builtin:reviews``: generated product and movie reviews with a sentiment
  label (Positive, Negative, Neutral, Mixed); the same generator feeds the
  ``builtin:sentiment4`` task. Mixed reviews join a positive and a negative
  clause ("I thought the animation was good, but the movie disappointed me.").
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip",
             "tkinter", "__pycache__"}
LABELS = ("Positive", "Negative", "Neutral", "Mixed")


def python_docs(min_chars: int = 40) -> Iterator[str]:
    """Module, class and function docstrings of the standard library, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith(("test", "config-")) for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


MOVIE = dict(
    things=["movie", "film", "sequel", "documentary", "series", "show"],
    aspects=["acting", "story", "plot", "soundtrack", "animation", "dialogue", "ending",
             "cinematography", "pacing", "cast", "script", "visual effects", "humor"],
)
PRODUCT = dict(
    things=["blender", "laptop", "headphones", "backpack", "coffee maker", "phone case",
            "keyboard", "vacuum cleaner", "desk lamp", "running shoes", "tent", "camera"],
    aspects=["battery life", "build quality", "design", "price", "sound", "screen", "packaging",
             "customer service", "delivery", "instructions", "material", "fit", "weight"],
)
GOOD = ["great", "excellent", "wonderful", "fantastic", "superb", "good", "impressive",
        "delightful", "brilliant", "solid"]
BAD = ["terrible", "awful", "disappointing", "poor", "boring", "horrible", "cheap", "mediocre",
       "frustrating", "weak"]
POSITIVE = [
    "I loved the {a}.", "The {a} was {good}.", "What a {good} {t}!", "The {a} is simply {good}.",
    "I would happily recommend this {t} to anyone.", "Everything about the {a} felt {good}.",
    "This {t} exceeded my expectations.", "Five stars, the {a} is {good}.",
    "I really enjoyed the {a}.", "The {a} made me smile.",
]
NEGATIVE = [
    "I hated the {a}.", "The {a} was {bad}.", "What a {bad} {t}.", "The {a} is simply {bad}.",
    "I would not recommend this {t} to anyone.", "Everything about the {a} felt {bad}.",
    "This {t} was a waste of money.", "One star, the {a} is {bad}.",
    "The {a} disappointed me.", "I regret buying this {t}.",
]
NEUTRAL = [
    "I watched the {t} last {day}.", "The {t} arrived on {day}.", "The {a} is as described.",
    "It comes in {color}.", "I bought this {t} for my {who}.", "The {t} is about {n} {unit} long.",
    "I have had the {t} for {n} weeks.", "The {a} is similar to other ones I have tried.",
    "My {who} picked the {t}.", "It is a {t} with a {color} finish.",
]
MIXED = [
    "I thought the {a} was {good}, but the {a2} was {bad}.",
    "The {a} was {good}, however the {a2} disappointed me.",
    "I loved the {a} but hated the {a2}.",
    "Although the {a} is {bad}, the {a2} is {good}.",
    "The {a} is {good}, yet the {a2} is {bad}.",
    "Great {a}, but the {a2} was {bad}.",
]
FILL = dict(day=["Monday", "Tuesday", "Friday", "Sunday", "week", "month"],
            color=["black", "white", "blue", "red", "grey"],
            who=["brother", "sister", "mother", "father", "friend", "kids"],
            n=["two", "three", "four", "ten", "six"], unit=["inches", "hours", "feet"])


def review(rng: random.Random, label: str) -> str:
    """One review whose sentiment is ``label``: one to three sentences."""
    kind = rng.choice((MOVIE, PRODUCT))
    thing = rng.choice(kind["things"])

    def fill(template: str) -> str:
        a, a2 = rng.sample(kind["aspects"], 2)
        values = {k: rng.choice(v) for k, v in FILL.items()}
        text = template.format(t=thing, a=a, a2=a2, good=rng.choice(GOOD), bad=rng.choice(BAD),
                               **values)
        return text[0].upper() + text[1:]

    neutral = [fill(rng.choice(NEUTRAL)) for _ in range(rng.randint(0, 1))]
    if label == "Positive":
        core = [fill(t) for t in rng.sample(POSITIVE, rng.randint(1, 2))]
    elif label == "Negative":
        core = [fill(t) for t in rng.sample(NEGATIVE, rng.randint(1, 2))]
    elif label == "Mixed":
        core = [fill(rng.choice(MIXED))]
    else:
        core = [fill(t) for t in rng.sample(NEUTRAL, rng.randint(1, 2))]
    sentences = neutral + core
    return " ".join(sentences)


def labeled_reviews(n: int, seed: int = 0, weights: Sequence[float] = (1, 1, 1, 1)
                    ) -> Iterator[tuple[str, str]]:
    """``n`` (text, label) pairs, labels drawn with ``weights`` over LABELS."""
    rng = random.Random(seed)
    for _ in range(n):
        label = rng.choices(LABELS, weights=weights)[0]
        yield review(rng, label), label


def reviews(n: int = 20000, seed: int = 0) -> Iterator[str]:
    """The texts of ``builtin:reviews``."""
    for text, _ in labeled_reviews(n, seed):
        yield text
