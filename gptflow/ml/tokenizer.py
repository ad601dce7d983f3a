"""Tokenizers, all stored as a Hugging Face ``tokenizer.json``:

* byte-level BPE trained with ``tokenizers`` (Rust), any UTF-8 round-trips;
  encoding goes through ``tiktoken`` built from the same vocabulary (identical
  ids, about 2x faster, parallel over documents);
* character level (nanoGPT's Shakespeare-char), encoded with numpy;
* any existing ``tokenizer.json`` loaded from disk.

Every tokenizer has an end-of-text token (document separator) and a padding token.
Added and special tokens (``<|im_start|>``) encode to their ids in every path. A
pretrained model's tokenizer also carries a :class:`TokenizerConfig` (its BOS/EOS
and its chat template), kept as ``tokenizer_config.json`` beside ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

EOT, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"
THREADS = os.cpu_count() or 1
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-printable-unicode table used by ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


@dataclass(frozen=True)
class TokenizerConfig:
    """What ``tokenizer.json`` does not say: the model's BOS/EOS and how it chats
    (the fields of Hugging Face's ``tokenizer_config.json`` that gptflow uses)."""

    bos_token: str | None = None
    eos_token: str | None = None  # generation stops here (<|im_end|> for ChatML models)
    pad_token: str | None = None
    add_bos_token: bool = False  # BOS before every encoded prompt
    chat_template: str | None = None  # jinja2, rendered as transformers renders it

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> TokenizerConfig:
        def token(value: Any) -> str | None:  # a string, or {"content": ...} (AddedToken)
            return value.get("content") if isinstance(value, Mapping) else value

        template = data.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            None)
        return cls(token(data.get("bos_token")), token(data.get("eos_token")),
                   token(data.get("pad_token")), bool(data.get("add_bos_token", False)),
                   template)

    def to_hf(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Tokenizer:
    def __init__(self, hf: HFTokenizer, config: TokenizerConfig | None = None) -> None:
        self.hf = hf
        self.config = config or TokenizerConfig()
        spec = json.loads(hf.to_str())
        self.kind = _kind(spec)
        eos = (self.config.eos_token,) if self.config.eos_token else ()
        self.eot_id = self._special(*eos, EOT, "</s>", "<|end_of_text|>", "<eos>")
        pad = (self.config.pad_token,) if self.config.pad_token else ()
        self.pad_id = self._special(*pad, PAD, "<pad>", default=self.eot_id)
        bos = self.config.bos_token
        self.bos_id = self._special(bos, default=-1) if bos else None

    def _special(self, *names: str, default: int | None = None) -> int:
        """The id of the first of ``names`` the vocabulary has."""
        for token in names:
            found = self.hf.token_to_id(token)
            if found is not None:
                return int(found)
        if default is None:
            raise ValueError(f"tokenizer has no {names[0]} token")
        return default

    # -- construction -----------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
                  ) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[EOT, PAD], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        for special in (EOT, PAD, UNK):
            vocab[special] = len(vocab)
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([EOT, PAD, UNK])
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """``tokenizer.json`` (a file, or the folder holding it) and the
        ``tokenizer_config.json`` beside it, if any."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        beside = file.with_name("tokenizer_config.json")
        config = (TokenizerConfig.from_hf(json.loads(beside.read_text(encoding="utf-8")))
                  if beside.is_file() else None)
        return cls(HFTokenizer.from_file(str(file)), config)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` to ``path``, and its config beside it when it has one."""
        path = Path(path)
        self.hf.save(str(path))
        if self.config != TokenizerConfig():
            path.with_name("tokenizer_config.json").write_text(
                json.dumps(self.config.to_hf(), indent=2), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    # -- encoding -----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.encode_batch([text])[0]]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, int64; added and special tokens written in the
        text (``<|im_start|>``) are their ids, as transformers encodes them."""
        return self._encode(texts, specials=True)

    def _encode(self, texts: Sequence[str], specials: bool) -> list[np.ndarray]:
        """Token ids of each text; with ``specials`` false the fast path keeps special
        tokens as plain text (the Rust tokenizer splits them out either way)."""
        if self.kind == "char":
            return [self._char_ids(t) for t in texts]
        if self.kind == "bpe":
            batches = (self._tiktoken.encode_batch(list(texts), num_threads=THREADS,
                                                   allowed_special="all") if specials
                       else self._tiktoken.encode_ordinary_batch(list(texts),
                                                                 num_threads=THREADS))
            return [np.asarray(ids, dtype=np.int64) for ids in batches]
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model expects it: BOS first where its config says so."""
        ids = self.encode(text)
        if self.config.add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (jinja2 in a
        sandbox, with transformers' settings), ready to encode."""
        if not self.config.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return render_template(self.config.chat_template, messages=list(messages),
                               add_generation_prompt=add_generation_prompt,
                               bos_token=self.config.bos_token or "",
                               eos_token=self.config.eos_token or "")

    def encode_documents(self, docs: Sequence[str], chunk_chars: int = 1 << 20) -> np.ndarray:
        """One stream of ids with end-of-text after every document (an integer array).

        For BPE, documents are joined by the end-of-text token into ~1 MB
        chunks, encoded straight to numpy by tiktoken in parallel threads:
        tiktoken splits on the special token first, so the ids equal
        per-document encoding, at several times the speed on short documents.
        Corpora are data, not prompts: special tokens written in a document
        stay text (a literal ``<|endoftext|>`` is no document boundary).
        """
        if self.kind != "bpe" or any(EOT in d for d in docs):
            eot = np.array([self.eot_id], dtype=np.int64)
            return np.concatenate([part for ids in self._encode(docs, specials=False)
                                   for part in (ids, eot)]
                                  or [np.zeros(0, dtype=np.int64)])
        chunks, current, size = [], [], 0
        for doc in docs:
            current.append(doc)
            size += len(doc)
            if size >= chunk_chars:
                chunks.append(EOT.join(current) + EOT)
                current, size = [], 0
        if current:
            chunks.append(EOT.join(current) + EOT)
        encoding = self._tiktoken
        with ThreadPoolExecutor(THREADS) as pool:  # tiktoken releases the GIL
            encoded = list(pool.map(
                lambda chunk: encoding.encode_to_numpy(chunk, allowed_special={EOT},
                                                 disallowed_special=()), chunks))
        return np.concatenate(encoded or [np.zeros(0, dtype=np.uint32)])

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special))

    @cached_property
    def line_breaks(self) -> frozenset[int]:
        """The ids whose text holds a newline: where a one-line answer is complete."""
        return frozenset(i for i in range(self.hf.get_vocab_size())
                         if "\n" in self.hf.decode([i], skip_special_tokens=False))

    @cached_property
    def _char_table(self) -> np.ndarray:
        vocab = self.hf.get_vocab()
        chars = {c: i for c, i in vocab.items() if len(c) == 1}
        table = np.full(max(map(ord, chars)) + 1, vocab[UNK], dtype=np.int64)
        for c, i in chars.items():
            table[ord(c)] = i
        return table

    def _char_ids(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        table = self._char_table
        known = points < len(table)
        unk = int(self.hf.token_to_id(UNK) or 0)
        return np.where(known, table[np.where(known, points, 0)], unk)

    @cached_property
    def _tiktoken(self) -> Any:
        """A tiktoken encoding over this BPE vocabulary: same ids, faster."""
        import tiktoken

        decode = _byte_decoder()
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        ranks = {bytes(decode[c] for c in token): i
                 for token, i in self.hf.get_vocab(with_added_tokens=False).items()
                 if token not in specials}
        added = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items()}
        return tiktoken.Encoding("gptflow-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=added)


MAX_RENDER_CHARS = 1 << 22  # what one rendering may write: far beyond any context
MAX_LOOP_ITEMS = 1 << 20  # items all of one rendering's range() calls may yield


def render_template(source: str, **context: Any) -> str:
    """A model's chat template rendered as transformers renders it (a sandbox that
    cannot touch Python objects, trimmed blocks, ``raise_exception``, ``tojson``),
    within bounds: a template comes with a model file, and nested loops or string
    doubling would otherwise take minutes and gigabytes. Raises ValueError
    ("model chat template: ...")."""
    from jinja2.exceptions import TemplateError

    try:
        template = _compiled(source)
        template.environment.loop_items = 0  # each rendering has the whole budget
        pieces, written = [], 0
        for piece in template.generate(**context):
            written += len(piece)
            if written > MAX_RENDER_CHARS:
                raise TemplateError(f"writes more than {MAX_RENDER_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except (TemplateError, RecursionError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"model chat template: {type(e).__name__}: {e}") from None


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    """A chat template compiled once, in a sandboxed environment of its own that
    holds its rendering budget (a model's template is rendered once per example)."""
    return _chat_environment().from_string(source)


def _chat_environment() -> Any:
    """A sandboxed jinja2 environment with a loop budget that each rendering resets."""
    from jinja2.compiler import CodeGenerator, Frame
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.nodes import Concat
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def bounded(value: Any) -> Any:
        if isinstance(value, str | list | tuple) and len(value) > MAX_RENDER_CHARS:
            raise TemplateError(f"builds a value of more than {MAX_RENDER_CHARS:,} items")
        return value

    class Generator(CodeGenerator):
        def visit_Concat(self, node: Concat, frame: Frame) -> None:  # ``a ~ b``, bounded
            self.write("environment.concat_bounded((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Bounded(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset(["*", "**", "+"])
        loop_items = 0

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise TemplateError(f"refuses {left!r} ** {right}")
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if operator == "*" and isinstance(seq, str | list | tuple) and isinstance(
                    times, int) and len(seq) * times > MAX_RENDER_CHARS:
                raise TemplateError(f"builds a value of more than {MAX_RENDER_CHARS:,} items")
            return bounded(super().call_binop(context, operator, left, right))

        def concat_bounded(self, parts: tuple[Any, ...]) -> str:
            return str(bounded("".join(map(str, parts))))

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def counted_range(*args: int) -> range:
        items = range(*args)
        env.loop_items += len(items)
        if env.loop_items > MAX_LOOP_ITEMS:
            raise TemplateError(f"loops over more than {MAX_LOOP_ITEMS:,} items")
        return items

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return str(bounded(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                                      separators=separators, sort_keys=sort_keys)))

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, range=counted_range)
    return env


def _kind(spec: dict[str, Any]) -> str:
    model = spec.get("model", {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    if model == "WordLevel" and pre.get("type") == "Split":
        return "char"
    if (model == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and not spec.get("normalizer")):
        return "bpe"
    return "hf"
