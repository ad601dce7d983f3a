"""GGUF files in and out: llama.cpp's and ollama's format, with the ``gguf`` package
(llama.cpp's own; the ``gguf`` extra) for its types and de-quantization.

Hyper-parameters come from the file's metadata, the weights are memory-mapped
and de-quantized by the package's vectorised ``gguf.quants.dequantize`` (F32,
F16, BF16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants alike), in parallel threads,
and the tokenizer is rebuilt from ``tokenizer.ggml.*``: the BPE vocabulary and
merges, its control and user-defined tokens as added tokens, BOS/EOS and the
chat template. The header is parsed here, not by ``gguf.GGUFReader``, which
builds a numpy view per vocabulary entry (7 s for a 49k vocabulary on these
machines, where reading it whole takes 0.1 s). Writing goes the other way with
the package's writer and quantizers (F16, BF16, Q8_0, Q4_0, ...).

llama.cpp stores the q and k projections of the Llama architecture with their
rows interleaved for its RoPE kernel; reading undoes that permutation, so the
weights are Hugging Face's again.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptflow.ml.config import GPTConfig
from gptflow.ml.families import HFError
from gptflow.ml.model import GPT, claimed_layers, shape_problems, state_shapes
from gptflow.ml.tokenizer import Tokenizer, TokenizerConfig

MAGIC = b"GGUF"
# llama.cpp's general.architecture names we map -> whether its converter interleaved q/k
ARCHITECTURES = {"llama": True, "qwen2": False, "gemma3": False}
EXPORTED = ("llama", "qwen2")  # the families GGUF export writes
# tokenizer.ggml.pre -> the split that runs before byte-level BPE (None: GPT-2's)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
SPLITS: dict[str, str | None] = {"default": None, "gpt2": None, "smollm": None,
                                 "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT,
                                 "qwen2": QWEN2_SPLIT}
# tokenizer.ggml.token_type values (llama.cpp's; 5 is an unused piece)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6
SPACE = "\u2581"  # SentencePiece's visible space

# llama.cpp tensor names -> gptflow's, per block
BLOCK = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
         "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",  # Gemma 3's own:
         "post_attention_norm": "attn_post_norm", "post_ffw_norm": "mlp_post_norm"}
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp's: every 6th layer full, the rest sliding
GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp's RoPE base of Gemma 3's sliding layers
TOP = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}


class GGUFError(HFError):
    """A GGUF file gptflow cannot map; the message names the key or tensor."""


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: (rows, columns)
    qtype: int  # gguf.GGMLQuantizationType
    offset: int  # from the start of the file


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata and the tensor table of a GGUF file (versions 2 and 3). Every
    count and length the header claims is checked against the bytes that follow it
    before anything is read or allocated for it; a lie is a GGUFError naming where."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file ({size} bytes)")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mapped)  # pages are read as the header is parsed, no further
    try:
        metadata, tensors = _parse_header(path, buf)
    except struct.error:
        raise GGUFError(f"{path}: the header is truncated (the file ends at byte "
                        f"{size:,})") from None
    finally:
        buf.release()
        mapped.close()
    for t in tensors:
        if t.qtype not in GGML_QUANT_SIZES:
            raise GGUFError(f"{path}: tensor {t.name}: unknown type {t.qtype}")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.qtype)]
        elements = int(np.prod(t.shape, dtype=np.float64))
        if any(d < 1 for d in t.shape) or t.shape[-1] % block:
            raise GGUFError(f"{path}: tensor {t.name}: shape {t.shape} does not fit its "
                            f"type's blocks of {block}")
        end = t.offset + elements // block * type_size
        if end > size:
            raise GGUFError(f"{path}: tensor {t.name}: its data ends at byte {end:,}, past "
                            f"the end of the file ({size:,} bytes)")
    return metadata, tensors


def _parse_header(path: Path, buf: memoryview) -> tuple[dict[str, Any], list[TensorInfo]]:
    from gguf import GGUFValueType

    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def room(count: int, item_bytes: int, what: str) -> int:
        """``count`` items of at least ``item_bytes`` each fit in what is left."""
        if count * item_bytes > len(buf) - pos:
            raise GGUFError(f"{path}: {what} at byte {pos:,} claims {count:,} items; the "
                            f"{len(buf) - pos:,} bytes left cannot hold them")
        return count

    def text() -> str:
        nonlocal pos
        n = room(take("Q"), 1, "a string")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

    scalar = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
              GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
              GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
              GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}

    def value(kind: int, depth: int = 0) -> Any:
        nonlocal pos
        if kind == GGUFValueType.STRING:
            return text()
        if kind == GGUFValueType.ARRAY:
            item, count = take("I"), take("Q")
            if item in scalar:  # numbers: one vectorised read
                dtype = np.dtype("<" + scalar[GGUFValueType(item)])
                values = np.frombuffer(buf, dtype, room(count, dtype.itemsize, "an array"),
                                       pos).tolist()
                pos += dtype.itemsize * count
                return values
            if depth > 2 or item not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                raise GGUFError(f"{path}: an array at byte {pos:,} of value type {item}")
            return [value(item, depth + 1) for _ in range(room(count, 8, "an array"))]
        if kind not in scalar:
            raise GGUFError(f"{path}: a value at byte {pos:,} of unknown type {kind}")
        return take(scalar[GGUFValueType(kind)])

    if bytes(buf[:4]) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2, 3)")
    metadata = {}
    for _ in range(room(n_kv, 12, "the metadata")):  # a key's length and a value's type
        key = text()
        metadata[key] = value(take("I"))
    infos = []
    for _ in range(room(n_tensors, 24, "the tensor table")):
        name = text()
        rank = take("I")
        if not 1 <= rank <= 4:
            raise GGUFError(f"{path}: tensor {name}: {rank} dimensions (1 to 4)")
        dims = [take("Q") for _ in range(rank)]
        qtype, offset = take("I"), take("Q")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or not 1 <= align <= 1 << 20:
        raise GGUFError(f"{path}: general.alignment {align!r} is not a sane alignment")
    start = pos + (-pos) % align
    return metadata, [TensorInfo(name, shape, qtype, start + offset)
                      for name, shape, qtype, offset in infos]


def load_gguf(path: Path) -> tuple[GPT, Tokenizer]:
    """A GGUF file as a gptflow GPT (float32, eval mode) and its tokenizer; the
    model is built on the meta device and takes the de-quantized tensors as they
    are, so no second copy of the weights is ever made."""
    metadata, tensors = read_header(path)
    meta = _Metadata(metadata, {t.name for t in tensors}, path)
    config = config_from_gguf(meta)
    names = {t.name: gptflow_name(t.name, meta) for t in tensors}
    problem = claimed_layers(config, names.values(), f"{meta.arch}.block_count") or \
        shape_problems(state_shapes(config), {names[t.name]: t.shape for t in tensors},
                       "the metadata")
    if problem:
        raise GGUFError(f"{path}: tensors do not match the metadata: {problem}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # numpy releases the GIL
        state = dict(zip(names.values(), pool.map(
            lambda t: _weight(data, t, names[t.name], config, ARCHITECTURES[meta.arch]),
            tensors), strict=True))
    return GPT.from_state_dict(config, state).eval(), tokenizer_from_gguf(meta)


class _Metadata:
    """A GGUF file's key/value metadata; a missing key is an error that names it."""

    def __init__(self, fields: dict[str, Any], tensor_names: set[str], path: Path) -> None:
        self.fields, self.tensor_names, self.path = fields, tensor_names, path
        self.arch = str(self.get("general.architecture"))
        if self.arch not in ARCHITECTURES:
            raise GGUFError(f"{path}: general.architecture {self.arch!r} is not supported "
                            f"({', '.join(ARCHITECTURES)})")

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.fields:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key {key} is missing")
            return default
        return self.fields[key]

    def arch_key(self, key: str, default: Any = ...) -> Any:
        return self.get(f"{self.arch}.{key}", default)


def config_from_gguf(meta: _Metadata) -> GPTConfig:
    heads = int(meta.arch_key("attention.head_count"))
    d = int(meta.arch_key("embedding_length"))
    head_size = int(meta.arch_key("attention.key_length", d // heads))
    rope_dim = meta.arch_key("rope.dimension_count", head_size)
    if rope_dim != head_size:
        raise GGUFError(f"{meta.path}: {meta.arch}.rope.dimension_count {rope_dim} differs "
                        f"from the head size {head_size} (partial RoPE is not supported)")
    vocab = meta.arch_key("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens"))
    layers = int(meta.arch_key("block_count"))
    switches: dict[str, Any] = dict(mlp="swiglu", qkv_bias=meta.arch == "qwen2")
    if meta.arch == "gemma3":  # what llama.cpp knows of Gemma 3 without being told
        # the 27B model (62 layers) scales scores by d / heads, every other by the head size
        scalar = d // heads if layers == 62 else head_size
        switches = dict(
            mlp="geglu", qk_norm=True, norm_offset=1.0, embed_scale=True, post_norms=True,
            query_pre_attn_scalar=float(scalar), rope_local_theta=GEMMA3_LOCAL_THETA,
            sliding_window=int(meta.arch_key("attention.sliding_window")),
            layer_types=tuple("full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0
                              else "sliding_attention" for i in range(layers)))
        if meta.arch_key("rope.scaling.type", "none") not in ("none", None):
            switches["rope_scaling"] = {"rope_type": meta.arch_key("rope.scaling.type"),
                                        "factor": float(meta.arch_key("rope.scaling.factor"))}
    return GPTConfig(
        vocab_size=int(vocab), context=int(meta.arch_key("context_length")),
        n_layer=layers, n_head=heads,
        n_kv_head=int(meta.arch_key("attention.head_count_kv", heads)), d_model=d,
        head_size=None if head_size == d // heads else head_size,
        d_ff=int(meta.arch_key("feed_forward_length")), position="rope", norm="rmsnorm",
        bias=False, rope_theta=float(meta.arch_key("rope.freq_base", 10000.0)),
        norm_eps=float(meta.arch_key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in meta.tensor_names, **switches)


def gptflow_name(name: str, meta: _Metadata) -> str:
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part in BLOCK:
            return f"blocks.{index}.{BLOCK[part]}.{kind}"
    elif stem in TOP:
        return f"{TOP[stem]}.{kind}"
    raise GGUFError(f"{meta.path}: tensor {name} has no gptflow counterpart")


def _weight(data: np.ndarray, tensor: TensorInfo, name: str, config: GPTConfig,
            interleaved: bool) -> Tensor:
    """One tensor de-quantized to float32, in Hugging Face's row order."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(tensor.qtype)
    shape = quants.quant_shape_to_byte_shape(tensor.shape, qtype)
    raw = data[tensor.offset:tensor.offset + int(np.prod(shape))].reshape(shape)
    array = quants.dequantize(raw, qtype).astype(np.float32, copy=False)
    if not array.flags.writeable:  # an F32 tensor is a view of the (read-only) file
        array = array.copy()
    weight = torch.from_numpy(array.reshape(tensor.shape))
    if config.norm_offset and name.endswith("norm.weight"):  # llama.cpp stores offset + w
        weight = weight - config.norm_offset
    if interleaved and name.endswith("attn.q_proj.weight"):
        weight = unpermute(weight, config.n_head)
    elif interleaved and name.endswith("attn.k_proj.weight"):
        weight = unpermute(weight, config.kv_heads)
    return weight.contiguous()


def unpermute(weight: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's q/k row interleaving: (heads, 2, half) rows were written as
    (heads, half, 2)."""
    out, inp = weight.shape
    return weight.reshape(heads, out // heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _merge(text: str) -> tuple[str, str]:
    left, _, right = text.partition(" ")
    return left, right


def tokenizer_from_gguf(meta: _Metadata) -> Tokenizer:
    """The tokenizer a GGUF file describes: byte-level BPE (``tokenizer.ggml.model:
    gpt2``: GPT-2, Llama 3, Qwen, SmolLM) or SentencePiece (``llama``: Llama 2,
    Mistral, Gemma), with its special tokens, BOS/EOS and chat template."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens")]
    types = list(meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    scores = list(meta.get("tokenizer.ggml.scores") if kind == "llama"  # merges by score
                  else meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
    for key, table in (("token_type", types), ("scores", scores)):
        if len(table) != len(tokens):
            raise GGUFError(f"{meta.path}: tokenizer.ggml.{key} has {len(table):,} entries, "
                            f"tokenizer.ggml.tokens {len(tokens):,}")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        index = meta.get(f"tokenizer.ggml.{key}", None)
        if index is not None and not (isinstance(index, int) and 0 <= index < len(tokens)):
            raise GGUFError(f"{meta.path}: tokenizer.ggml.{key} {index!r} is not a token id "
                            f"(0 to {len(tokens) - 1:,})")
    if kind == "gpt2":
        hf = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        hf = _sentencepiece(tokens, scores, types,
                            bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    else:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported "
                        "(gpt2: byte-level BPE; llama: SentencePiece)")
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind_ in zip(tokens, types, strict=True)
                           if kind_ == TOKEN_CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind_ in zip(tokens, types, strict=True) if kind_ == TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}", None)
        return tokens[index] if index is not None else None

    return Tokenizer(hf, TokenizerConfig(
        bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template", None)))


def _byte_level_bpe(meta: _Metadata, tokens: list[str]) -> Any:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SPLITS:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.pre {pre!r} is not supported "
                        f"(byte-level BPE splits: {', '.join(SPLITS)})")
    merges = [_merge(str(m)) for m in meta.get("tokenizer.ggml.merges")]
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    split = SPLITS[pre]
    hf.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
                        if split is None else pre_tokenizers.Sequence([
                            pre_tokenizers.Split(Regex(split), behavior="isolated"),
                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece(tokens: list[str], scores: list[float], types: list[int],
                   space_prefix: bool) -> Any:
    """SentencePiece's BPE as a tokenizers BPE. SentencePiece merges, of the pairs of
    neighbours whose concatenation is a piece, the one whose piece scores highest;
    that is BPE with every way of splitting each piece in two as a merge, ranked by
    the piece's score. Spaces are written as U+2581, text gets one in front (unless
    the model says not), and characters outside the vocabulary fall back to its
    ``<0xNN>`` byte pieces."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for i in sorted((i for i, k in enumerate(types) if k == TOKEN_NORMAL),
                    key=lambda i: -scores[i]):
        piece = tokens[i]
        merges += sorted(((piece[:j], piece[j:]) for j in range(1, len(piece))
                          if piece[:j] in vocab and piece[j:] in vocab),
                         key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    unknown = next((t for t, k in zip(tokens, types, strict=True) if k == TOKEN_UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token=unknown, fuse_unk=True,
                                byte_fallback=True))
    prefix = [normalizers.Prepend(SPACE)] if space_prefix else []
    hf.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                    decoders.Fuse(), *strip])
    return hf


# -- out ---------------------------------------------------------------------------
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def permute(weight: Tensor, heads: int) -> Tensor:
    """llama.cpp's q/k row interleaving (what :func:`unpermute` undoes)."""
    out, inp = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def write_gguf(model: GPT, tokenizer: Tokenizer, path: Path, kind: str = "f16") -> None:
    """A plain Llama or Qwen2 model as a GGUF file that llama.cpp, ollama and
    transformers' GGUF loader read: 2-D weights in ``kind`` (norms and biases stay
    F32), the byte-level BPE tokenizer with its split, special tokens, BOS/EOS and
    chat template."""
    import gguf

    from gptflow.ml.families import family_of

    c = model.config
    arch = family_of(c).name
    if arch not in EXPORTED:
        raise GGUFError(f"GGUF export covers {', '.join(EXPORTED)}, not {arch}")
    if kind not in GGUF_TYPES:
        raise GGUFError(f"GGUF type {kind!r} is not one gptflow writes ({', '.join(GGUF_TYPES)})")
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    writer = gguf_writer(c, tokenizer, path)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        w = tensor.detach().float().cpu()
        if ARCHITECTURES[arch] and name.endswith("attn.q_proj.weight"):
            w = permute(w, c.n_head)
        elif ARCHITECTURES[arch] and name.endswith("attn.k_proj.weight"):
            w = permute(w, c.kv_heads)
        data = w.numpy()
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_writer(c: GPTConfig, tokenizer: Tokenizer | None, path: Path) -> Any:
    """A ``gguf.GGUFWriter`` with the model's hyper-parameters and tokenizer (unless
    None: the caller writes its own) written: add the tensors, then write it out."""
    import gguf

    from gptflow.ml.families import family_of

    arch = family_of(c).name
    vocabulary = vocabulary_kind(tokenizer) if tokenizer is not None else None
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(path.stem)
    writer.add_block_count(c.n_layer)
    writer.add_context_length(c.context)
    writer.add_embedding_length(c.d_model)
    writer.add_feed_forward_length(c.ff_dim)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    if tokenizer is not None and vocabulary is not None:
        _write_tokenizer(writer, tokenizer, vocabulary)
    return writer


def gguf_name(name: str) -> str:
    """llama.cpp's name of a gptflow tensor (the inverse of :func:`gptflow_name`)."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blocks."):
        _, index, part = stem.split(".", 2)
        return f"blk.{index}.{ {v: k for k, v in BLOCK.items()}[part]}.{kind}"
    return f"{ {v: k for k, v in TOP.items()}[stem]}.{kind}"


def vocabulary_kind(tokenizer: Tokenizer) -> tuple[str, str | bool]:
    """How GGUF names this tokenizer: ``("gpt2", pre)``, byte-level BPE with the
    ``tokenizer.ggml.pre`` of its split, or ``("llama", space_prefix)``, SentencePiece
    (what :func:`_sentencepiece` builds). Anything else is an error, raised before
    a file is written."""
    spec = json.loads(tokenizer.hf.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    norm = spec.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if model.get("type") == "BPE" and model.get("byte_fallback") and any(
            step.get("type") == "Replace" and step.get("content") == SPACE for step in steps):
        return "llama", any(step.get("type") == "Prepend" for step in steps)
    if tokenizer.kind == "bpe":
        return "gpt2", "default"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (model.get("type") == "BPE" and len(parts) == 2
            and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"):
        pattern = parts[0].get("pattern", {}).get("Regex")
        names = {split: name for name, split in reversed(SPLITS.items()) if split}
        if pattern in names:
            return "gpt2", names[pattern]
    raise GGUFError("GGUF export needs a SentencePiece tokenizer or a byte-level BPE one "
                    f"whose split GGUF names ({', '.join(SPLITS)})")


def _write_tokenizer(writer: Any, tokenizer: Tokenizer, kind: tuple[str, str | bool]) -> None:
    vocab = tokenizer.hf.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    added = {t.content: t.special for t in tokenizer.hf.get_added_tokens_decoder().values()}
    model = json.loads(tokenizer.hf.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    writer.add_tokenizer_model(kind[0])
    writer.add_token_list(tokens)
    if kind[0] == "gpt2":
        writer.add_tokenizer_pre(kind[1])
        writer.add_token_merges([" ".join(m) for m in merges])
    else:  # a piece scores by its first merge: read back, the merges come out the same
        writer.add_add_space_prefix(bool(kind[1]))
        first: dict[str, int] = {}
        for rank, (left, right) in enumerate(merges):
            first.setdefault(left + right, rank)
        writer.add_token_scores([-float(first.get(t, len(merges))) for t in tokens])
    writer.add_token_types([
        TOKEN_CONTROL if added.get(t) else TOKEN_USER_DEFINED if t in added
        else TOKEN_UNKNOWN if t == model.get("unk_token")
        else TOKEN_BYTE if re.fullmatch("<0x[0-9A-F]{2}>", t) and kind[0] == "llama"
        else TOKEN_NORMAL for t in tokens])
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(tokenizer.config.add_bos_token)
    if tokenizer.config.chat_template:
        writer.add_chat_template(tokenizer.config.chat_template)
