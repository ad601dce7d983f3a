"""One GPT decoder whose parts are switches (see :class:`GPTConfig`).

H0 = W_e[x] (+ P for learned positions); each block is
h = h + attn(norm(h)); h = h + mlp(norm(h)); logits = W^T norm(h) with W the
token embedding when tied. Shapes: B batch, T time, C d_model, nh heads,
nkv key/value heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gptflow.ml.config import GPTConfig


class RMSNorm(nn.Module):
    """x / rms(x) · (offset + w); Gemma's offset 1 keeps w around 0, and computes in fp32.
    Otherwise w takes x's dtype: a bf16 x (autocast) with an fp32 w misses torch's
    fused kernel."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        if self.offset:
            normed = F.rms_norm(x.float(), (x.size(-1),), None, self.eps)
            return (normed * (self.offset + self.weight.float())).type_as(x)
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim or config.d_model, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(dim or config.d_model, eps=config.norm_eps, bias=config.bias)


ROPE_START = 4096  # positions of RoPE tables a model starts with


def rope_cache(config: GPTConfig, length: int, device: torch.device | None = None,
               local: bool = False) -> tuple[Tensor, Tensor]:
    """cos and sin tables, (length, hs), in the rotate-half layout (as Llama); ``local``:
    the sliding layers' own base (Gemma 3), never scaled."""
    hs = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, device=device).float() / hs))
    inv_freq = scale_rope(inv_freq, {} if local else config.rope_scaling or {})
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)  # (L, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hs)
    return angles.cos(), angles.sin()


def scale_rope(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Stretch RoPE frequencies for a longer context. ``linear`` divides them all
    by ``factor``; ``llama3`` (Llama 3.1) divides only the low frequencies (long
    wavelengths), keeps the high ones and blends those in between."""
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long, 1: short
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, T, hs); cos, sin: (T, hs)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Preallocated keys and values for every layer: generation costs O(T) per token."""

    def __init__(self, config: GPTConfig, batch: int, length: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (batch, config.kv_heads, length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = length

    def repeat(self, batch: int) -> KVCache:
        """This cache's first row as ``batch`` rows: one prompt, several continuations."""
        copy = object.__new__(KVCache)
        copy.k = [t[:1].repeat(batch, 1, 1, 1) for t in self.k]
        copy.v = [t[:1].repeat(batch, 1, 1, 1) for t in self.v]
        copy.length = self.length
        return copy

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = start + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        hs, nh, nkv = config.head_dim, config.n_head, config.kv_heads
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(config.d_model, nh * hs, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, nkv * hs, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, nkv * hs, bias=qkv_bias)
        self.o_proj = nn.Linear(nh * hs, config.d_model, bias=config.bias)
        self.o_proj.residual = True  # type: ignore[assignment]  # scaled init
        if config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, hs), make_norm(config, hs)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None,
                start: int, mask: Tensor | SharedPrefix | None) -> Tensor:
        B, T, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:  # per head, over hs
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, nkv, start+T, hs)
        y = mask.attend(self.attend, q, k, v) if isinstance(mask, SharedPrefix) \
            else self.attend(q, k, v, start, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))  # (B, T, C)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start: int, mask: Tensor | None) -> Tensor:
        """Queries at positions start.. over keys from position 0, (B, nh, T, hs)."""
        cfg = self.config
        dropout = cfg.dropout if self.training else 0.0
        if cfg.attention == "sdpa":
            def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout,
                    is_causal=mask is None and start == 0 and q.size(2) > 1,
                    scale=cfg.attn_scale, enable_gqa=cfg.kv_heads != cfg.n_head)
            if q.device.type == "cpu" and q.dtype != torch.float32 and not cpu_has_amx():
                # a CPU without AMX tiles runs half-precision flash attention ~1.6x
                # slower than fp32's (forward and backward, measured): compute it in fp32
                if mask is not None and mask.dtype != torch.bool:
                    mask = mask.float()  # an additive mask, in the scores' dtype
                with torch.autocast("cpu", enabled=False):
                    return sdpa(q.float(), k.float(), v.float(), mask).to(q.dtype)
            return sdpa(q, k, v, mask)
        return naive_attention(q, k, v, mask, dropout, causal=start == 0, scale=cfg.attn_scale)


@dataclass(frozen=True)
class SharedPrefix:
    """B rows that begin with the same ``length`` tokens (a task's definition, in a
    batch of its instances), packed as one sequence: those tokens once, then each
    row's rest (B x S). Layers that act per position see (1, P + B·S) tokens;
    attention lets the prefix see itself causally and each rest the prefix and its
    own earlier tokens: the padded batch's results, for (B - 1)·P fewer tokens."""

    length: int  # P
    rows: int  # B
    prefix_mask: Tensor | None  # (P, P) or None (causal), as attention_mask gives it
    rest_mask: Tensor | None  # (S, P + S)

    def attend(self, attend: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v (1, heads, P + B·S, hs) -> (1, nh, P + B·S, hs)."""
        P, B = self.length, self.rows

        def rest(t: Tensor) -> Tensor:  # (1, h, B·S, hs) -> (B, h, S, hs)
            return t[0, :, P:].reshape(t.size(1), B, -1, t.size(3)).transpose(0, 1)

        head = attend(q[:, :, :P], k[:, :, :P], v[:, :, :P], 0, self.prefix_mask)
        keys = torch.cat([k[:, :, :P].expand(B, -1, -1, -1), rest(k)], dim=2)  # (B, h, P+S, hs)
        values = torch.cat([v[:, :, :P].expand(B, -1, -1, -1), rest(v)], dim=2)
        tail = attend(rest(q), keys, values, P, self.rest_mask)  # (B, nh, S, hs)
        return torch.cat([head, tail.transpose(0, 1).flatten(1, 2)[None]], dim=2)


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (where half-precision attention pays)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def naive_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float,
                    causal: bool = True, scale: float | None = None) -> Tensor:
    """softmax(QK^T · scale (1 / sqrt(hs)) + causal mask) V, written out; the reference
    for sdpa. No mask and not ``causal``: every query sees every key (one new token)."""
    T, S = q.size(2), k.size(2)
    if k.size(1) != q.size(1):  # grouped-query: each K/V head serves n_head/nkv query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) * (scale or q.size(-1) ** -0.5)  # (B, nh, T, S)
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = att.softmax(dim=-1)
    att = F.dropout(att, p=dropout, training=dropout > 0)
    return att @ v  # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gated = config.mlp != "gelu"
        self.act = F.silu if config.mlp == "swiglu" else partial(F.gelu, approximate="tanh")
        hidden = config.ff_dim
        self.up_proj = nn.Linear(config.d_model, hidden, bias=config.bias)
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.down_proj.residual = True  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = make_norm(config), make_norm(config)
        self.attn, self.mlp = Attention(config, layer), MLP(config)
        if config.post_norms:
            self.attn_post_norm, self.mlp_post_norm = make_norm(config), make_norm(config)
        self.post_norms = config.post_norms
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None,
                start: int, mask: Tensor | SharedPrefix | None) -> Tensor:
        a = self.attn(self.attn_norm(x), rope, cache, start, mask)
        x = x + self.dropout(self.attn_post_norm(a) if self.post_norms else a)
        m = self.mlp(self.mlp_norm(x))
        return x + self.dropout(self.mlp_post_norm(m) if self.post_norms else m)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = (nn.Embedding(config.context, config.d_model)
                          if config.position == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if config.position == "rope":
            self._rope_tables(torch.float32)
        # per block: its sliding window (None: full attention), and whether it takes the
        # sliding layers' own RoPE tables
        self.layer_kinds = tuple((w, w is not None and config.rope_local_theta is not None)
                                 for w in map(config.window, range(config.n_layer)))
        self.apply(self._init)
        self.recompute_blocks = False
        """Activation checkpointing: keep only each block's input for the backward pass
        and run the block again there (a third more compute, a fraction of the
        activation memory). A training switch, never saved with the model."""

    def _rope_tables(self, dtype: torch.dtype, device: torch.device | None = None,
                     length: int | None = None) -> None:
        """RoPE's cos and sin tables as buffers (never saved), the sliding layers' own too,
        for the first ``length`` positions: they grow as sequences need them (see
        :meth:`hidden`), so a context a file merely claims (2^26) costs nothing."""
        length = min(ROPE_START if length is None else length, self.config.context)
        for local, prefix in ((False, "rope"), (True, "rope_local")):
            if local and self.config.rope_local_theta is None:
                continue
            cos, sin = rope_cache(self.config, length, device, local)
            self.register_buffer(f"{prefix}_cos", cos.to(dtype), persistent=False)
            self.register_buffer(f"{prefix}_sin", sin.to(dtype), persistent=False)

    def _init(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            scale = math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 1
            nn.init.normal_(module.weight, mean=0.0, std=std / scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    @classmethod
    def from_state_dict(cls, config: GPTConfig,
                        state: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                        linear: Callable[[nn.Linear], nn.Module] | None = None) -> GPT:
        """A model that takes ``state``'s tensors as they are (their dtype and device):
        built on the meta device, so no weights are initialised only to be
        overwritten, and no second copy of them is made. ``state`` may arrive one
        tensor at a time, and ``linear`` turn each linear layer into the form it is
        kept in as soon as its weight arrives (QLoRA's 4-bit base): then the
        full-precision weights never all exist at once."""
        with torch.device("meta"):
            model = cls(config)
        modules = dict(model.named_modules())
        tensors: dict[str, Tensor] = {}
        for key, tensor in state.items() if isinstance(state, Mapping) else state:
            name = key.removesuffix(".weight")
            layer = modules.pop(name, None) if name != key else None  # not kept: freed
            if linear is None or not isinstance(layer, nn.Linear):
                tensors[key] = tensor
                continue
            layer.weight = nn.Parameter(tensor, requires_grad=False)
            kept = linear(layer)  # its bias, if any, is assigned with the rest below
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, kept)
            tensors.update({f"{name}.{k}": v for k, v in kept.named_buffers()})
        model.load_state_dict(tensors, strict=not config.tie_embeddings, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        if config.position == "rope":  # in the weights' dtype, as .to(dtype) would leave it
            embed = tensors["embed.weight"]
            model._rope_tables(embed.dtype, embed.device)
        return model

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False, real: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids at positions start..start+T -> logits (B, T or 1, V)."""
        x = self.hidden(idx, cache, start, real=real)
        return self.lm_head(x[:, -1:] if last_only else x)  # (B, T, V)

    def hidden(self, idx: Tensor, cache: KVCache | None = None, start: int = 0,
               shared: int = 0, real: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (B, T, C) that the head reads: a loss
        that needs the head at a few positions only computes it there. ``shared``:
        every row's first ``shared`` tokens are the same and need no state of their
        own; they are computed once (see :class:`SharedPrefix`) and the states of the
        positions after them are returned, (B, T - shared, C). ``real`` (B, >= start
        + T): which positions hold a token rather than left padding (prompts of
        different lengths decoded together); no query sees a padding key."""
        B, T = idx.shape
        if start + T > self.config.context:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context "
                             f"({self.config.context})")
        cfg = self.config
        positions = torch.arange(start, start + T, device=idx.device)
        if shared:  # (1, P + B·S): the prefix once, then each row's rest
            idx = torch.cat([idx[0, :shared], idx[:, shared:].flatten()])[None]
            positions = torch.cat([positions[:shared], positions[shared:].repeat(B)])
        x = self.embed(idx)  # (B, T, C)
        if cfg.embed_scale:  # sqrt(C) in the embedding's dtype, as Gemma rounds it
            x = x * torch.tensor(cfg.d_model ** 0.5, dtype=x.dtype)
        ropes: dict[bool, tuple[Tensor, Tensor]] = {}
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            table = self.get_buffer("rope_cos")
            if start + T > len(table):  # twice as long, or as needed: a few growths at most
                self._rope_tables(table.dtype, table.device, max(start + T, 2 * len(table)))
            for local in {local for _, local in self.layer_kinds}:
                prefix = "rope_local" if local else "rope"
                ropes[local] = (self.get_buffer(f"{prefix}_cos")[positions],
                                self.get_buffer(f"{prefix}_sin")[positions])
        x = self.dropout(x)
        masks: dict[int | None, Tensor | SharedPrefix | None] = {
            w: attention_mask(T, start, w, idx.device, real) if not shared else SharedPrefix(
                shared, B, attention_mask(shared, 0, w, idx.device),
                attention_mask(T - shared, shared, w, idx.device))
            for w in {w for w, _ in self.layer_kinds}}  # one per distinct window
        recompute = self.recompute_blocks and torch.is_grad_enabled()
        for block, (window, local) in zip(self.blocks, self.layer_kinds, strict=True):
            rope, mask = ropes.get(local), masks[window]
            x = checkpoint(block, x, rope, cache, start, mask, use_reentrant=False) \
                if recompute else block(x, rope, cache, start, mask)
        return self.norm(x[0, shared:].reshape(B, -1, x.size(-1)) if shared else x)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the weights plus 12·L·C·T for attention (PaLM)."""
        cfg = self.config
        n = self.num_params() - (self.pos_embed.weight.numel() if self.pos_embed is not None else 0)
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * (seq_len or cfg.context)


def attention_mask(T: int, start: int, window: int | None, device: torch.device,
                   real: Tensor | None = None) -> Tensor | None:
    """Which keys (positions 0..start+T) each of T new queries sees, (T, start+T): the
    earlier ones and itself, the latest ``window`` of them in a sliding layer. None
    where plain causal attention is exact: from the start (is_causal) or one new token
    (sees the whole cache), with a window no narrower than that. With ``real`` (B, S'),
    (B, 1, T, start+T): no padding key either, but for a padding query itself (a row
    of -inf scores would give NaN, which even a masked key's zero weight carries on)."""
    S = start + T
    windowed = window is not None and window < S
    if real is None and not windowed:
        return None if start == 0 or T == 1 else torch.ones(
            T, S, dtype=torch.bool, device=device).tril(start)
    query = torch.arange(start, S, device=device)[:, None]
    key = torch.arange(S, device=device)[None]
    seen = key <= query  # (T, S)
    if window is not None and windowed:
        seen = seen & (query - key < window)
    if real is None:
        return seen
    return seen & (real[:, None, None, :S] | (key == query))  # (B, 1, T, S)


def state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a config's state dict holds, by name and shape (a tied head is the
    embedding, so it is not one of them); computed on the meta device."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()
                if not (config.tie_embeddings and k == "lm_head.weight")}


LAYER_INDEX = re.compile(r"\.(\d+)\.")  # blocks.3.attn..., model.layers.3..., blk.3...


def claimed_layers(config: GPTConfig, names: Iterable[str], source: str) -> str | None:
    """Whether ``source`` claims more layers than the tensors ``names`` hold, said
    before anything is built for it: a lying file's 10^6 layers would otherwise
    build 10^6 blocks (minutes, gigabytes) on the way to the shape check."""
    present = len({m.group(1) for name in names if (m := LAYER_INDEX.search(name))})
    if config.n_layer <= present:
        return None
    return f"{source} claims {config.n_layer:,} layers; the tensors hold {present}"


def shape_problems(expected: Mapping[str, tuple[int, ...]],
                   found: Mapping[str, tuple[int, ...]], source: str) -> str | None:
    """What a set of tensors lacks, has extra or has mis-shaped against ``expected``
    (what ``source`` implies), as one line; None when they match."""
    problems = [f"missing tensor {k}" for k in expected if k not in found]
    problems += [f"unexpected tensor {k}" for k in found if k not in expected]
    problems += [f"{k} has shape {found[k]}, {source} implies {shape}"
                 for k, shape in expected.items() if k in found and found[k] != shape]
    if not problems:
        return None
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more
