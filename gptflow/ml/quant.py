"""4-bit NormalFloat (NF4) weights, as in QLoRA: block-wise absmax scaling to
the 16 quantiles of a standard normal, two codes per byte, optionally with the
block scales themselves quantized to int8 (double quantization).

:class:`NF4Linear` keeps only the packed codes and dequantizes on the fly, in
forward and again in backward, so no full-precision copy of a frozen weight
outlives one layer's computation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptflow.ml.config import QUANT_METHODS

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
_BYTES = torch.arange(256)
_CODE_PAIRS = torch.stack([_BYTES & 0xF, _BYTES >> 4], dim=-1)  # a byte's two codes, low first
_NF4_PAIRS = NF4_LEVELS[_CODE_PAIRS]  # (256, 2): the levels of a byte's two codes
_INT4_PAIRS = _CODE_PAIRS.float()
SCALE_BLOCK = 256  # block scales per second-level scale in double quantization
GGUF_BLOCK = 32  # weights per block in GGUF's 4- and 8-bit types: int4's default group
ROW_BLOCK_ELEMENTS = 2**22  # weights a large 4-bit layer de-quantizes or repacks at once


def pack4(codes: Tensor) -> Tensor:
    """uint8 codes < 16, even count -> half as many bytes (low nibble first)."""
    return (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)


def unpack4(packed: Tensor) -> Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten()


def quantize_nf4(weight: Tensor, block: int = 64, double: bool = True) -> dict[str, Tensor]:
    """Packed NF4 codes of a weight and what it takes to dequantize them."""
    flat = weight.detach().float().flatten()
    pad = (-len(flat)) % block
    blocks = F.pad(flat, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    normalized = blocks / absmax[:, None]
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = torch.bucketize(normalized.flatten(), midpoints.to(flat.device)).to(torch.uint8)
    state: dict[str, Tensor] = {"codes": pack4(codes), "shape": torch.tensor(weight.shape)}
    if double:  # int8 scales around their mean, one fp32 scale per SCALE_BLOCK of them
        offset = absmax.mean()
        centred = F.pad(absmax - offset, (0, (-len(absmax)) % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
        scale2 = centred.abs().amax(dim=1).clamp(min=1e-12) / 127
        state.update(absmax_q=torch.round(centred / scale2[:, None]).to(torch.int8),
                     absmax_scale=scale2, absmax_offset=offset.reshape(1),
                     n_blocks=torch.tensor(len(absmax)))
    else:
        state["absmax"] = absmax
    return state


@cache
def nf4_quads(device: torch.device) -> Tensor:
    """(65536, 4): the levels of the four codes of a 16-bit word (two bytes, little
    endian), kept once per device (1 MB)."""
    words = torch.arange(65536)
    return torch.cat([_NF4_PAIRS[words & 0xFF], _NF4_PAIRS[words >> 8]], dim=1).to(device)


def dequantize_nf4(state: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    shape = tuple(int(s) for s in state["shape"])
    if "absmax" in state:
        absmax = state["absmax"]
    else:
        n = int(state["n_blocks"])
        absmax = (state["absmax_q"].float() * state["absmax_scale"][:, None]).flatten()[:n] \
            + state["absmax_offset"]
    # each 16-bit word holds four codes: look all four levels up at once (1.3-1.8x
    # faster than a byte's two on CPU), by 32-bit index (a 64-bit index of every
    # code would be the largest temporary by far)
    codes = state["codes"]
    padded = codes if codes.numel() % 2 == 0 else torch.cat([codes, codes.new_zeros(1)])
    words = padded.view(torch.int16).int().bitwise_and_(0xFFFF)
    values = nf4_quads(codes.device).index_select(0, words).flatten()[:2 * codes.numel()]
    numel = 1
    for s in shape:
        numel *= s
    blocks = values.view(len(absmax), -1)
    # the product in fp32, stored in ``dtype`` as it is written: one rounding, as a
    # cast after it would give, without a second pass over the weight
    out = torch.empty(blocks.shape, dtype=dtype, device=blocks.device)
    return torch.mul(blocks, absmax[:, None], out=out).flatten()[:numel].view(shape)


class _FrozenMatmul(torch.autograd.Function):
    """x @ W^T for a frozen quantized layer, W de-quantized in forward and again
    in backward (never saved), a block of rows at a time: gradients reach the
    layers below, none is kept for W, and a 4-bit embedding table serving as the
    head (150k rows) is never whole in full precision."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: NF4Linear | Int4Linear) -> Tensor:
        ctx.layer = layer
        device = x.device.type  # under autocast W is de-quantized straight into its dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else x.dtype
        outs = [F.linear(x, w) for _, w in layer.weight_blocks(dtype)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        blocks = ctx.layer.weight_blocks(grad.dtype)
        rows, w = next(blocks)
        total = grad[..., rows] @ w
        for rows, w in blocks:
            total.add_(grad[..., rows] @ w)
        return total, None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4."""

    codes: Tensor

    def __init__(self, linear: nn.Linear, block: int = 64, double: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for name, tensor in quantize_nf4(linear.weight, block, double).items():
            self.register_buffer(name, tensor)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def state(self) -> dict[str, Tensor]:
        return dict(self.named_buffers())

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4(self.state(), dtype)

    def weight_blocks(self, dtype: torch.dtype) -> Iterator[tuple[slice, Tensor]]:
        """The de-quantized weight by blocks of rows: here one (NF4 blocks run across rows)."""
        yield slice(None), self.weight(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _FrozenMatmul.apply(x, self)  # type: ignore[no-untyped-call]
        return y if self.bias is None else y + self.bias


def logical_params(model: nn.Module) -> int:
    """Parameters as the model computes with them: quantized weights and their
    low-rank corrections count too."""
    quantized = (NF4Linear, Int8Linear, Int4Linear)
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, quantized)
    ) + sum(m.down.numel() + m.up.numel() for m in model.modules()
            if isinstance(m, LowRankCorrected))


def quantize_linears_nf4(model: nn.Module, block: int = 64, double: bool = True) -> int:
    """Replace the quantizable linear layers with NF4Linear; returns how many."""
    return replace_linears(model, lambda linear: NF4Linear(linear, block, double))


def dequantize_model(model: nn.Module, kinds: tuple[type[nn.Module], ...] | None = None,
                     dtype: torch.dtype = torch.float32) -> int:
    """Put ``dtype`` nn.Linear / nn.Embedding layers back in place of every
    quantized one (of ``kinds`` only, if given; a tied head follows its
    embedding); returns how many."""
    kinds = kinds or (NF4Linear, Int8Linear, Int4Linear, QuantEmbedding)

    def quantized(module: nn.Module) -> bool:  # a corrected layer folds its correction in
        return isinstance(module.quantized if isinstance(module, LowRankCorrected) else module,
                          kinds)

    found: list[tuple[str, Any]] = [(name, m) for name, m in model.named_modules()
                                    if quantized(m) and not {"table", "quantized"}
                                    & set(name.split("."))]
    for name, module in found:
        plain: nn.Module
        if isinstance(module, QuantEmbedding):
            table = module.table
            plain = nn.Embedding(table.out_features, table.in_features)
            plain.weight = nn.Parameter(table.weight(dtype), requires_grad=False)
        else:
            plain = nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(module.weight(dtype), requires_grad=False)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    if QuantEmbedding in kinds and getattr(getattr(model, "config", None), "tie_embeddings",
                                           False):
        embed: nn.Embedding = getattr(model, "embed")  # noqa: B009
        head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False)
        head.weight = embed.weight
        model.lm_head = head
    return len(found)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Swap every linear layer (but a head tied to the embedding) for ``make(layer)``."""
    tied = getattr(getattr(model, "config", None), "tie_embeddings", True)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not (tied and name == "lm_head")]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(module))
    return len(targets)


def _as_2d(x: Tensor) -> Tensor:
    return x.reshape(-1, x.size(-1))


class Int8Linear(nn.Module):
    """Int8 weights, symmetric per output channel: w = q · scale.

    On CPU the matmul runs in one of PyTorch's int8 kernels: weight-only
    (``_weight_int8pack_mm``, bf16 activations), or with ``dynamic`` the
    activations are quantized too, per token at each call (a per-tensor scale
    lets one outlier channel flatten every other: SmolLM2's perplexity tripled).
    One token at a time (generation) runs the quantized engine's dynamic linear,
    where a tensor is a token (fbgemm / oneDNN: 1.8-3x fp32); more rows run
    ``_int_mm`` on int8 rows, each with its own scale. Both read the same
    stored weights."""

    qweight: Tensor
    scales: Tensor

    def __init__(self, linear: nn.Linear, dynamic: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self.dynamic = dynamic
        self._packed: Any = None  # the kernel's own layout, built on first use

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            y = F.linear(x, self.weight(x.dtype))
        elif self.dynamic:
            y = self._dynamic(_as_2d(x).float()).to(x.dtype).view(*x.shape[:-1], -1)
        else:
            if self._packed is None:
                self._packed = self.scales.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(_as_2d(x).to(torch.bfloat16), self.qweight,
                                                   self._packed)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _dynamic(self, x: Tensor) -> Tensor:
        if len(x) > 1:  # int8 rows, one scale per token; _int_mm wants more than 16 rows
            scales = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
            q = torch.round(x / scales).to(torch.int8)
            rows = F.pad(q, (0, 0, 0, max(17 - len(q), 0)))
            return torch._int_mm(rows, self.qweight.T)[:len(q)] * scales * self.scales
        if self._packed is None:  # quantized tensors: deprecated upstream, in 2.13 still
            zeros = torch.zeros(self.out_features, dtype=torch.long)  # the fast path
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*quantized tensor creation")
                weight = torch._make_per_channel_quantized_tensor(
                    self.qweight, self.scales.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(weight, None)
        # 7-bit activations (reduce_range): no int16 overflow in the kernels of CPUs
        # without VNNI
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)  # type: ignore[no-any-return]


class Int4Linear(nn.Module):
    """Weight-only int4, group-wise and asymmetric: w = q · scale + low for
    q in 0..15 over each group's [min, max], two codes per byte (GGUF's Q4_1;
    a Q4_1 model at group 32 round-trips exactly, where a symmetric grid added
    30% to SmolLM2's perplexity). On CPU the matmul runs in PyTorch's int4 kernel
    (the weight is repacked into its layout once, in memory)."""

    qweight: Tensor
    scales: Tensor
    lows: Tensor

    def __init__(self, linear: nn.Linear, group_size: int = GGUF_BLOCK) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % group_size:
            raise ValueError(f"in_features {self.in_features} is not a multiple of "
                             f"group_size {group_size}")
        self.group_size = group_size
        groups, device = self.in_features // group_size, linear.weight.device
        self.register_buffer("qweight", torch.empty(self.out_features, self.in_features // 2,
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(self.out_features, groups,
                                                   dtype=torch.float16, device=device))
        self.register_buffer("lows", torch.empty_like(self.scales))
        for rows in self._row_blocks():  # fp32 temporaries of a block only (150k-row tables)
            w = linear.weight[rows].detach().float().view(-1, groups, group_size)
            low = w.amin(dim=-1).half()  # fp16, as GGUF stores them; codes are rounded
            scales = ((w.amax(dim=-1) - low) / 15).clamp(min=2**-24).half()  # against these
            q = torch.round((w - low[..., None].float()) / scales[..., None].float())
            self.qweight[rows] = pack4(q.clamp(0, 15).to(torch.uint8).flatten()).view(len(w), -1)
            self.scales[rows], self.lows[rows] = scales, low
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self._packed: tuple[Tensor, Tensor] | None = None
        self.keep_packed = False
        """Run PyTorch's CPU int4 kernel on the weight repacked once into its layout, and
        kept (as much memory again): inference turns it on. Otherwise (a QLoRA base,
        whose point is memory) the weight is de-quantized a block of rows at a time."""

    def _row_blocks(self, multiple: int = 1) -> Iterator[slice]:
        """Slices of rows of about ROW_BLOCK_ELEMENTS weights, each a multiple of ``multiple``."""
        step = max(multiple, ROW_BLOCK_ELEMENTS // self.in_features // multiple * multiple)
        return (slice(s, s + step) for s in range(0, self.out_features, step))

    def _pack(self) -> tuple[Tensor, Tensor]:
        """The weight in the CPU kernel's layout, and its scales and zero points as
        the kernel takes them: it computes (q - 8) · scale + zero. Packed by blocks
        of rows (the kernel's layout is per 64 rows, so blocks of 64k rows join
        exactly): the kernel takes int32 codes, 8x the packed bytes."""
        packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack4(self.qweight[rows].flatten()).view(-1, self.in_features).to(torch.int32), 1)
            for rows in self._row_blocks(multiple=64)])
        scales = self.scales.float()
        zeros = self.lows.float() + 8 * scales
        return packed, torch.stack([scales.T, zeros.T], -1).contiguous().to(torch.bfloat16)

    def rows(self, index: Tensor | slice = slice(None)) -> Tensor:
        """Some rows of the weight (all by default), de-quantized."""
        codes = _INT4_PAIRS.to(self.qweight.device).index_select(  # as NF4's: 32-bit index
            0, self.qweight[index].flatten().int())
        scales, lows = self.scales[index].float(), self.lows[index].float()
        return codes.view(*scales.shape, self.group_size).mul_(scales[..., None]) \
            .add_(lows[..., None]).flatten(-2)

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.rows().to(dtype)

    def weight_blocks(self, dtype: torch.dtype) -> Iterator[tuple[slice, Tensor]]:
        """The de-quantized weight by blocks of rows of about ROW_BLOCK_ELEMENTS weights."""
        for rows in self._row_blocks():
            yield rows, self.rows(rows).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        training = x.requires_grad and torch.is_grad_enabled()  # the kernel has no backward
        if self.keep_packed and not training and x.device.type == "cpu" \
                and self.out_features % 16 == 0:  # the kernel's layout
            self._packed = self._packed or self._pack()
            packed, scales_zeros = self._packed
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                _as_2d(x).to(torch.bfloat16), packed, self.group_size, scales_zeros)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = _FrozenMatmul.apply(x, self)  # type: ignore[no-untyped-call]
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """A token embedding stored as the rows of an int8 or int4 layer; the same
    layer can serve as the tied output head, so the matrix is stored once."""

    def __init__(self, table: Int8Linear | Int4Linear) -> None:
        super().__init__()
        self.table = table

    def forward(self, idx: Tensor) -> Tensor:
        t = self.table
        if isinstance(t, Int8Linear):
            return t.qweight[idx].float() * t.scales[idx][..., None]
        return t.rows(idx)


def quantize_model(model: nn.Module, method: str, group_size: int = GGUF_BLOCK,
                   embeddings: bool = False) -> int:
    """Replace every linear layer (but a head tied to a full-precision embedding)
    with its quantized form, and with ``embeddings`` the token embedding too
    (int8/int4; a tied head then shares its quantized table); bf16 casts the whole
    model instead. Returns how many layers were replaced (or cast)."""
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r} ({', '.join(QUANT_METHODS)})")
    if method == "bf16":  # half the bytes, no grid: every weight, embedding included
        model.to(torch.bfloat16)
        return sum(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    if method == "nf4":
        if embeddings:
            raise ValueError("nf4 keeps embeddings in full precision; use int8 or int4")
        return quantize_linears_nf4(model, group_size, double=True)

    def make(linear: nn.Linear) -> Int8Linear | Int4Linear:
        if method == "int4":
            return Int4Linear(linear, group_size)
        return Int8Linear(linear, dynamic=method == "int8-dynamic")

    return (quantize_embedding(model, make) if embeddings else 0) + replace_linears(model, make)


class LowRankCorrected(nn.Module):
    """A quantized linear layer plus a rank-r correction of its rounding error:
    W ≈ Q(W) + up · down, the factors in fp16 (ZeroQuant-V2's low-rank compensation).

    Why: fine-tuning a 4-bit model moves its weights by less than one step of the
    4-bit grid, so int4 alone rounds the fine-tune away (SmolLM2: every int4 code of
    its 60-step fine-tune equals the base's, and the task accuracy falls back toward
    the base's); the error's top singular directions keep what tuning changed."""

    down: Tensor
    up: Tensor

    def __init__(self, quantized: nn.Module, rank: int, error: Tensor | None = None) -> None:
        super().__init__()
        self.quantized = quantized
        in_features: int = getattr(quantized, "in_features")  # noqa: B009 (nn.Module typing)
        out_features: int = getattr(quantized, "out_features")  # noqa: B009
        self.in_features, self.out_features = in_features, out_features
        rank = min(rank, in_features, out_features)
        self.register_buffer("down", torch.zeros(rank, in_features, dtype=torch.float16))
        self.register_buffer("up", torch.zeros(out_features, rank, dtype=torch.float16))
        if error is not None:  # randomized SVD: 4 power iterations match the exact one here
            u, s, v = torch.svd_lowrank(error.float(), q=min(2 * rank, in_features,
                                                               out_features), niter=4)
            root = s[:rank].sqrt()  # split evenly between the factors: both fit fp16
            self.up.copy_(u[:, :rank] * root)
            self.down.copy_((v[:, :rank] * root).T)

    @property
    def bias(self) -> Tensor | None:
        bias: Tensor | None = getattr(self.quantized, "bias")  # noqa: B009
        return bias

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        weight: Tensor = getattr(self.quantized, "weight")(torch.float32)  # noqa: B009
        return (weight + self.up.float() @ self.down.float()).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.quantized(x)
        return y + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


def correct_low_rank(model: nn.Module, rank: int,
                     originals: Mapping[str, Tensor] | None = None) -> int:
    """Wrap every quantized linear layer (an embedding's table and a head sharing it
    aside) in :class:`LowRankCorrected`: fitted to its layer's rounding error given
    ``originals`` (the full-precision weights by layer name), zeros to be loaded
    otherwise. Returns how many layers were wrapped."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (NF4Linear, Int8Linear, Int4Linear))
             and "table" not in name.split(".")]
    for name, layer in found:
        error = None if originals is None else originals[name] - layer.weight()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LowRankCorrected(layer, rank, error))
    return len(found)


def quantize_embedding(model: nn.Module, make: Callable[[nn.Linear], Int8Linear | Int4Linear]
                       ) -> int:
    """The token embedding as the rows of the quantized layer ``make`` builds; a tied
    head becomes that same layer, so the matrix is stored once. Returns how many
    layers were replaced."""
    embed: nn.Embedding = getattr(model, "embed")  # noqa: B009
    table = make(_as_linear(embed.weight))
    model.embed = QuantEmbedding(table)  # type: ignore[assignment]
    if getattr(model, "config").tie_embeddings:  # noqa: B009
        model.lm_head = table  # type: ignore[assignment]
        return 2
    return 1


def _as_linear(weight: Tensor) -> nn.Linear:
    """A linear layer around ``weight`` (built on the meta device: no weight of its own
    is allocated and initialised first, 545 MB for a 150k-token fp32 table)."""
    linear = nn.Linear(weight.size(1), weight.size(0), bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear
