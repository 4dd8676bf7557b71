"""The Stable Diffusion v1 UNet with JeDi's joint self-attention, in the CompVis layout.

Module and parameter names are LDM's (``openaimodel.UNetModel`` + ``attention.SpatialTransformer``), so an SD v1
``model.diffusion_model.*`` state dict loads without renaming (see :mod:`jedi.weights` for diffusers layouts):

    time_embed.{0,2}                         Linear(C0 -> 4C0), SiLU, Linear(4C0 -> 4C0)
    input_blocks.0.0                         conv_in, 3x3, in_channels -> C0
    input_blocks.i.0                         ResBlock (in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection)
    input_blocks.i.1                         SpatialTransformer (norm, proj_in, transformer_blocks.j, proj_out)
    input_blocks.i.0.op                      Downsample, 3x3 stride-2 conv
    middle_block.{0,1,2}                     ResBlock, SpatialTransformer, ResBlock
    output_blocks.i.{0,1,2}                  ResBlock, [SpatialTransformer], [Upsample .conv]
    out.{0,2}                                GroupNorm, SiLU, 3x3 conv -> out_channels

JeDi's two changes: the input is ``prepare_inputs(x_t, x0, ng_mask)`` (x_t, masked x0, mask: 4+4+1 channels), and
every ``attn1`` is a :class:`jedi_kernels.SetAttention` attending jointly over the ``set_size`` images of each set.

Two configurations serve as peers in the benchmarks (``benchmarks/table6.py``): ``in_channels=4`` is plain SD (x_t is
the whole input; with ``set_size=1`` every attn1 is ordinary self-attention), and ``extra_context_dim`` gives every
``attn2`` key/value projections over extra context tokens (ELITE-like local mapping, see :class:`CrossAttention`).

Dimension letters: B sets, G set size, N = B*G images, L = h*w tokens, M context tokens, H heads, D head dim,
C channels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import jedi_kernels as jk
from jedi_kernels.modules import DerivedWeights, SetAttention, out_bias_foldable, out_without_bias
from jedi_kernels.backends import triton_ok
from jedi.config import UNetConfig

__all__ = [
    "JeDiUNet",
    "GroupNorm32",
    "TimestepEmbedding",
    "ResBlock",
    "Downsample",
    "Upsample",
    "GEGLU",
    "FeedForward",
    "CrossAttention",
    "TransformerBlock",
    "SpatialTransformer",
    "Block",
    "ContextKV",
    "SkipCat",
    "TimeEmb",
    "Keep",
    "timestep_embedding",
]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM's sinusoidal timestep embedding, cos first: ``[cos(t f_k), sin(t f_k)]``, f_k = max_period**(-k/half).

    Args:
        timesteps: (N,) int or float.
        dim: embedding width (even widths; an odd one gets a zero pad column, as in LDM).

    Returns:
        (N, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _by_index(indices: list[int], parts) -> tuple:
    """``parts[i]`` at position ``indices[i]`` of a tuple (None where no part goes): the per-module slots of
    :class:`ContextKV` and :class:`TimeEmb`, for the modules that took part in the shared GEMM."""
    slots = [None] * (max(indices) + 1)
    for i, t in zip(indices, parts):
        slots[i] = t
    return tuple(slots)


def _foldable(conv: nn.Module) -> bool:
    """``conv`` is a plain zero-padded ``nn.Conv2d`` with a bias, which ``fold_bias`` may apply elsewhere (a subclass
    or a wrapper, e.g. a LoRA layer, keeps its own forward)."""
    return type(conv) is nn.Conv2d and conv.bias is not None and conv.padding_mode == "zeros"


def _conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _residual_add_ok(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``module`` (a ResBlock or SpatialTransformer with ``residual_add`` on) may hand its output conv's bias to
    ``jk.residual_add``: outside torch.compile (inductor fuses the adds into its own kernels) and autocast (the op
    takes one dtype), with x in the weight's dtype."""
    return (module.residual_add and not torch.compiler.is_compiling() and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type))


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1


def _pointwise(conv: nn.Conv2d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv`` applied to x with ``bias`` in place of ``conv.bias``. A 1x1 conv of a channels-last x runs as a GEMM
    over its (N, h, w, C) view, whose epilogue adds the bias: torch adds a cuDNN convolution's bias in a separate
    broadcast pass over the output (cuDNN convolutions take no bias), the slow strided kind of elementwise kernel.
    The result is channels-last then too."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and _is_pointwise(conv):
        w = conv.weight.reshape(conv.out_channels, conv.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), w, bias).permute(0, 3, 1, 2)
    return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (float64 inputs: in float64) and cast back to the input dtype (LDM's
    GroupNorm32). For float16/bfloat16 inputs with parameters of the same dtype that is torch's own GroupNorm, which
    accumulates in float32 and rounds once; other mixes (e.g. float32 parameters, or the folded SiLU below) take the
    explicit round trip.

    Two switches, set by :meth:`JeDiUNet.set_fused_ops` (parameters and names never change):
    ``fused`` runs it as ``jedi_kernels.group_norm`` (two passes over x, NCHW or NHWC, one rounding), and ``silu``
    applies the SiLU that follows it in ResBlocks and the output head (the model then swaps that ``nn.SiLU`` for an
    ``nn.Identity``), so norm and activation are one kernel. Under autograd the fused op runs only with its Triton
    backend (backend "triton", or "auto" on CUDA): its torch backend's backward is a chain of torch ops, slower than
    torch's native GroupNorm backward, so there the norm takes torch's path (same result).
    """

    fused: bool = False
    silu: bool = False
    backend: str = "auto"
    fp32_round_trip: bool = False  # LDM's explicit float32 round trip for half inputs too (benchmarks time both)

    def _run_fused(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> bool:
        if not self.fused:
            return False
        grad = x.requires_grad or (shift is not None and shift.requires_grad)
        if not (torch.is_grad_enabled() and (grad or any(p.requires_grad for p in self.parameters()))):
            return True
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W) -> x's shape, dtype and memory format. ``shift`` (N, C), optional: normalize
        ``x + shift[:, :, None, None]`` instead (a ResBlock's time embedding): inside the fused kernel, which then
        needs no pass for the sum; otherwise added in x's dtype first, as the unfused model does. ``concat``
        (N, C2, H, W), optional: normalize ``cat([x, concat], dim=1)`` (the fused kernels read both in place in
        inference; otherwise concatenated first)."""
        fused = self._run_fused(x, shift)
        if concat is not None and not fused:
            x, concat = torch.cat([x, concat], dim=1), None
        if fused:
            return jk.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, shift=shift,
                                 concat=concat, backend=self.backend)
        if shift is not None:
            x = x + shift.to(x.dtype)[:, :, None, None]
        if not (self.silu or self.fp32_round_trip) and x.dtype in (torch.float16, torch.bfloat16) and all(
                p is None or p.dtype == x.dtype for p in (self.weight, self.bias)):
            # torch's GroupNorm kernels (CUDA and CPU) already compute in float32 for half inputs and round once:
            # LDM's float32 round trip (casts of x, weight and bias, then back) gives the same values with four more
            # kernels and ~4x the memory traffic per norm (61 norms per SD step). (With the SiLU folded in, the
            # round trip stays: it rounds once after the SiLU.)
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        # float32 math for half inputs (LDM's GroupNorm32); float64 stays float64 (LDM's .float() would round it to
        # float32, which capped every float64 comparison of the model at ~1e-7)
        md = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        w = self.weight.to(md) if self.weight is not None else None
        b = self.bias.to(md) if self.bias is not None else None
        y = F.group_norm(x.to(md), self.num_groups, w, b, self.eps)
        return (F.silu(y) if self.silu else y).to(x.dtype)


class TimestepEmbedding(nn.Sequential):
    """Sinusoid(C0) -> Linear(C0, 4C0) -> SiLU -> Linear(4C0, 4C0); names ``time_embed.0`` / ``time_embed.2``.

    forward: timesteps (N,) -> (N, 4C0) in the Linear weights' dtype.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__(nn.Linear(channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.channels = channels

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.channels).to(self[0].weight.dtype)
        return super().forward(emb)


class TimeEmb(NamedTuple):
    """The time embedding with every folding ResBlock's second-norm shift already computed (``fold_bias``): one GEMM
    for all of them, ``Linear(SiLU(emb))`` with each block's ``emb_layers`` weights and its emb_layers + conv1 biases
    summed, instead of a SiLU, a 4-row GEMM and a bias add per block (66 small kernels for SD v1). ``shifts[i]`` is an
    (N, C) view for the ResBlock with ``emb_index == i``, ``skip_biases[i]`` its 1x1 skip conv's bias + its second
    conv's (one ``_foreach_add`` for all blocks; None or absent for a block without a skip conv); JeDiUNet builds it
    inside its forward and the blocks hand it to their ResBlocks in place of the embedding tensor."""

    emb: torch.Tensor
    shifts: tuple
    skip_biases: tuple = ()  # skip conv bias + conv2 bias per block with a 1x1 skip conv, all from one _foreach_add


class _Taken:
    """A read-only sequence that takes the kept images of ``seq[i]`` when entry i is read (None stays None): the
    per-block entries of a :class:`TimeEmb` or :class:`ContextKV` are sliced only for the blocks that still run."""

    def __init__(self, seq, take):
        self.seq, self.take = seq, take

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i):
        t = self.seq[i]
        return None if t is None else self.take(t)


class Keep:
    """The images a forward returns outputs for (``JeDiUNet.forward(out_positions=...)``): the same positions in
    every set of ``set_size`` images. The forward runs every image up to its last joint self-attention (whose keys
    and values need them all) and only these images after it; ``take*`` select them from per-image inputs.

    Args:
        set_size: G.
        positions: K strictly increasing positions in [0, G), K < G.
    """

    def __init__(self, set_size: int, positions: tuple[int, ...]):
        self.set_size, self.positions = set_size, tuple(positions)

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """(B*G, ...) -> (B*K, ...) in t's memory format; None stays None."""
        return None if t is None else jk.take_set_positions(t, self.set_size, self.positions)

    def take_emb(self, emb):
        """The time embedding (a tensor or a :class:`TimeEmb`, whose per-block shifts are taken when read)."""
        if isinstance(emb, TimeEmb):
            return TimeEmb(self.take(emb.emb), _Taken(emb.shifts, self.take), emb.skip_biases)
        return self.take(emb)

    def take_context(self, context):
        """The context (a tensor or a :class:`ContextKV`, whose per-block keys/values are taken when read)."""
        if isinstance(context, ContextKV):
            return ContextKV(self.take(context.context), _Taken(context.kv, self.take))
        return self.take(context)

    def take_all(self, emb, context, extra_context) -> tuple:
        """(emb, context, extra_context) of the kept images, for the layers after the last joint attention."""
        return self.take_emb(emb), self.take_context(context), self.take(extra_context)


class SkipCat(NamedTuple):
    """A decoder block's input ``torch.cat([h, skip], dim=1)`` not yet made (``ResBlock.skip_cat``): the block's
    fused GroupNorm reads both halves in place and its 1x1 skip conv runs as two GEMMs, one per half, the second
    accumulating into the first's output; anything else asks for :meth:`materialize`."""

    h: torch.Tensor
    skip: torch.Tensor

    def materialize(self) -> torch.Tensor:
        """The concatenation, (N, C_h + C_skip, h, w)."""
        return torch.cat([self.h, self.skip], dim=1)


def _pointwise_cat(conv: nn.Conv2d, x1: torch.Tensor, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 ``conv`` of cat([x1, x2], dim=1) (both channels-last) without the concatenation: a GEMM of x1 with
    the weight's first C1 columns (with ``bias`` in its epilogue), then one of x2 with the rest accumulating into it
    in place (cuBLAS beta = 1). The weight's column slices are strided views (no copies). Channels-last result."""
    N, C1, h, w = x1.shape
    wt = conv.weight.reshape(conv.out_channels, conv.in_channels)
    out = F.linear(x1.permute(0, 2, 3, 1), wt[:, :C1], bias)  # (N, h, w, C_out) contiguous
    out.view(-1, conv.out_channels).addmm_(x2.permute(0, 2, 3, 1).reshape(-1, x2.shape[1]), wt[:, C1:].t())
    return out.permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, + Linear(SiLU(emb)), GroupNorm-SiLU-conv3x3, residual (1x1 conv if widths differ).

    forward: x (N, C_in, h, w), emb (N, E) -> (N, C_out, h, w).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[3].weight)  # LDM's zero_module: a fresh block starts as the identity
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    fold_bias: bool = False  # the convs' biases applied in the adds / GEMMs that follow them (set_fused_ops)
    emb_index: int = -1  # this block's entry of a TimeEmb (JeDiUNet.set_fused_ops)
    # with fold_bias: the residual add takes the output bias (jk.residual_add, one pass; set_fused_ops), so neither
    # conv2 (cuDNN: a strided bias pass) nor the 1x1 skip GEMM (a bias epilogue) adds it
    residual_add: bool = False
    add_backend: str = "auto"
    # with fold_bias, in inference: take a decoder block's input as a SkipCat (the concatenation never made: the
    # fused GroupNorm reads both halves, the 1x1 skip conv runs as two GEMMs; set_fused_ops)
    skip_cat: bool = False

    def takes_skip_cat(self, h: torch.Tensor, skip: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs ``SkipCat(h, skip)`` without making the concatenation: ``skip_cat`` on, the
        folded path with a plain 1x1 skip conv and a fused first norm, both halves channels-last in the weights'
        dtype, and an inference call (no autograd, not compiling, no autocast)."""
        skip_conv, norm1 = self.skip_connection, self.in_layers[0]

        def nhwc(t):
            return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)

        return (self.skip_cat and self._folds() and isinstance(skip_conv, nn.Conv2d) and _is_pointwise(skip_conv)
                and isinstance(norm1, GroupNorm32) and norm1.fused and nhwc(h) and nhwc(skip)
                and h.dtype == skip.dtype == skip_conv.weight.dtype and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(h.device.type))

    def _shift_gemm_ok(self) -> bool:
        """This block's second-norm shift can come from the UNet's one GEMM (:class:`TimeEmb`)."""
        return (self._folds() and isinstance(self.emb_layers[0], nn.SiLU) and type(self.emb_layers[1]) is nn.Linear
                and self.emb_layers[1].bias is not None)

    def _folds(self) -> bool:
        conv1, conv2, skip = self.in_layers[2], self.out_layers[3], self.skip_connection
        return (self.fold_bias and _foldable(conv1) and _foldable(conv2)
                and (isinstance(skip, nn.Identity) or _foldable(skip)))

    def forward(self, x: torch.Tensor, emb) -> torch.Tensor:
        """x (N, C_in, h, w) or a :class:`SkipCat`, emb (N, E) or a :class:`TimeEmb` -> (N, C_out, h, w)."""
        conv1, conv2, skip = self.in_layers[2], self.out_layers[3], self.skip_connection
        cat = None
        if isinstance(x, SkipCat):
            if self.takes_skip_cat(x.h, x.skip):
                cat, x = x, x.h  # x: the first half (shapes and dtype); cat: both, for the norm and the skip GEMMs
            else:
                x = x.materialize()
        shift = None
        skip_bias = None
        if isinstance(emb, TimeEmb):
            if 0 <= self.emb_index < len(emb.shifts):
                shift = emb.shifts[self.emb_index]
            if 0 <= self.emb_index < len(emb.skip_biases):
                skip_bias = emb.skip_biases[self.emb_index]
            emb = emb.emb
        if not self._folds():
            h = self.in_layers(x)
            h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (N, C) -> (N, C, 1, 1)
            return self.skip_connection(x) + self.out_layers(h)
        # fold_bias: the same sums with fewer passes over the activations. conv1's bias joins the time embedding
        # ((N, C) + (C,) is tiny), and the sum goes into the second norm as its shift: the fused GroupNorm adds it
        # inside (no pass over h at all), torch's adds it first. conv2's bias joins the 1x1 skip conv's, which a
        # channels-last x runs as a GEMM with the bias in its epilogue; with residual_add both go into the residual
        # add instead (so an identity-skip block's conv2 runs without its bias too). A SkipCat input (skip_cat) is
        # normalized and projected half by half.
        norm1 = self.in_layers[0]
        h = norm1(cat.h, concat=cat.skip) if cat is not None else norm1(x)
        h = _conv_without_bias(conv1, self.in_layers[1](h))
        if shift is None:
            shift = self.emb_layers(emb).to(h.dtype) + conv1.bias.to(h.dtype)
        else:  # the UNet's one GEMM for every block (TimeEmb) already added both biases
            shift = shift.to(h.dtype)
        norm2 = self.out_layers[0]
        h = norm2(h, shift) if isinstance(norm2, GroupNorm32) else norm2(h + shift[:, :, None, None])
        h = self.out_layers[2](self.out_layers[1](h))
        one_pass = _residual_add_ok(self, x, conv2.weight)
        if isinstance(skip, nn.Identity):
            if one_pass:
                return jk.residual_add(x, _conv_without_bias(conv2, h), conv2.bias, backend=self.add_backend)
            return x + conv2(h)
        if skip_bias is None:
            skip_bias = skip.bias + conv2.bias
        if cat is not None:
            if one_pass:
                return jk.residual_add(_pointwise_cat(skip, cat.h, cat.skip, None), _conv_without_bias(conv2, h),
                                       skip_bias, backend=self.add_backend)
            return _pointwise_cat(skip, cat.h, cat.skip, skip_bias) + _conv_without_bias(conv2, h)
        if one_pass:
            return jk.residual_add(_pointwise(skip, x, None), _conv_without_bias(conv2, h), skip_bias,
                                   backend=self.add_backend)
        return _pointwise(skip, x, skip_bias) + _conv_without_bias(conv2, h)


class Downsample(nn.Module):
    """3x3 conv with stride 2 (``op``): (N, C, h, w) -> (N, C, h/2, w/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (``conv``): (N, C, h, w) -> (N, C, 2h, 2w).

    ``subpixel`` (set by :meth:`JeDiUNet.set_fused_ops`, with ``backend``) runs it as ``jedi_kernels.upsample_conv2d``:
    the 3x3 taps that read the same pixel of x summed into four 2x2 kernels, one convolution of x with 4x the output
    channels (0.44x the FLOPs, no upsampled tensor), and one pass that interleaves the phases and adds the bias. Only
    for a plain 3x3, stride-1, zero-padded ``nn.Conv2d`` (a wrapped conv keeps its own forward) and inputs in the
    weight's dtype outside autocast; backend "auto" runs it on CUDA only (elsewhere the reference, the same ops as
    unfused)."""

    subpixel: bool = False
    backend: str = "auto"

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def _subpixel_ok(self, x: torch.Tensor) -> bool:
        conv = self.conv
        return (self.subpixel and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros" and x.dtype == conv.weight.dtype
                and not torch.is_autocast_enabled(x.device.type))

    derived: DerivedWeights | None = None  # where the folded kernels are kept in a frozen scope (JeDiUNet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._subpixel_ok(x):
            folded = None
            triton = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)  # (torch: the reference)
            if triton and self.derived is not None and not torch.compiler.is_compiling() and self.derived.active:
                from jedi_kernels.ops import memory_format_of
                from jedi_kernels.ops.upsample_conv import fold_weight

                fmt = memory_format_of(x)
                folded = self.derived.get(("subpixel", id(self), fmt), lambda: fold_weight(self.conv.weight, fmt),
                                          lambda: (self.conv.weight,))
            return jk.upsample_conv2d(x, self.conv.weight, self.conv.bias, folded_weight=folded,
                                      backend=self.backend)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class GEGLU(nn.Module):
    """``a * gelu(g)`` with ``[a, g] = proj(x)``: (..., C) -> (..., C_out). With ``fused`` (set by
    :meth:`JeDiUNet.set_fused_ops`) the activation is one ``jedi_kernels.geglu`` pass over the projection; with
    ``fuse_linear`` (:meth:`JeDiUNet.set_fuse_ff`) the projection and the activation are one
    ``jedi_kernels.linear_geglu`` kernel on CUDA (a wrapped ``proj`` keeps its own forward)."""

    fused: bool = False
    backend: str = "auto"
    fuse_linear: bool = False

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def _linear_backend(self, x: torch.Tensor) -> str | None:
        """The ``linear_geglu`` backend for ``x``, or None to run the projection and the activation apart."""
        if not self.fuse_linear or type(self.proj) is not nn.Linear or x.dtype == torch.float64:
            return None
        if self.backend in ("triton", "torch"):
            return self.backend
        # auto: half precision on CUDA (float32 IEEE dots in Triton are far slower than cuBLAS)
        half = x.dtype in (torch.float16, torch.bfloat16)
        return "triton" if half and x.is_cuda and triton_ok(x.device) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._linear_backend(x)
        if backend is not None:
            return jk.linear_geglu(x, self.proj.weight, self.proj.bias, backend=backend)
        if self.fused:
            return jk.geglu(self.proj(x), backend=self.backend)
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(C -> 4C), Linear(4C -> C); names ``net.0.proj`` and ``net.2``: (N, L, C) -> (N, L, C)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContextKV(NamedTuple):
    """The text context with every cross-attention's keys and values already projected (``fuse_context_kv``): one
    GEMM for all of them (the context is the same for every block), each ``kv[i]`` an (N, M, 2*H*D) view
    [keys | values] of its output for the CrossAttention with ``kv_index == i``. JeDiUNet builds it inside its
    forward; the blocks hand it to their ``attn2`` in place of the context tensor."""

    context: torch.Tensor
    kv: tuple


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens to the text context (``attn2``), through torch SDPA.

    Parameters: ``to_q`` (C -> H*D), ``to_k``/``to_v`` (C_ctx -> H*D), no bias; ``to_out.0`` (H*D -> C) with bias.
    With ``extra_context_dim`` also ``to_k_extra``/``to_v_extra`` (C_extra -> H*D, no bias): ELITE-like local
    mapping. The T extra tokens (ELITE: the reference image's CLIP patch features) get their own keys and values,
    concatenated after the text's, and each query attends to all M + T keys in ONE softmax. (ELITE itself runs a
    second softmax over the local keys and adds its weighted output; the matmul FLOPs are the same.)

    forward: x (N, L, C), context (N, M, C_ctx) (or a :class:`ContextKV` with this module's keys and values
    projected), extra_context (N, T, C_extra) or None -> (N, L, C). None on a model with extra projections attends to
    the text alone (e.g. a guidance branch run without the local features).
    """

    kv_index: int = -1  # this module's entry of a ContextKV (JeDiUNet.set_fuse_context_kv)

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int,
                 extra_context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.extra_context_dim = extra_context_dim
        if extra_context_dim is not None:
            self.to_k_extra = nn.Linear(extra_context_dim, inner, bias=False)
            self.to_v_extra = nn.Linear(extra_context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor, extra_context: torch.Tensor | None = None, *,
                out_bias: bool = True) -> torch.Tensor:
        """out_bias: False leaves ``to_out[0].bias`` out of the result, as ``jedi_kernels.SetAttention`` does (the
        caller adds it; ValueError for an out-projection that is not a plain ``nn.Linear`` with a bias)."""
        out = self.to_out if out_bias else out_without_bias(self.to_out)
        N, L, _ = x.shape
        H, D = self.heads, self.dim_head
        kv = None
        if isinstance(context, ContextKV):
            kv = context.kv[self.kv_index] if 0 <= self.kv_index < len(context.kv) else None
            context = context.context
        if kv is not None:
            k, v = kv.chunk(2, dim=-1)  # (N, M, H*D) views of the one GEMM for all blocks
        else:
            k, v = self.to_k(context), self.to_v(context)  # (N, M, H*D)
        if extra_context is not None:
            if self.extra_context_dim is None:
                raise ValueError("extra_context given to a CrossAttention without extra projections "
                                 "(UNetConfig.extra_context_dim is None)")
            k = torch.cat([k, self.to_k_extra(extra_context)], dim=1)  # (N, M + T, H*D)
            v = torch.cat([v, self.to_v_extra(extra_context)], dim=1)
        M = k.shape[1]
        q = self.to_q(x).view(N, L, H, D).transpose(1, 2)  # (N, L, H*D) -> (N, H, L, D)
        k = k.view(N, M, H, D).transpose(1, 2)  # (N, M, H*D) -> (N, H, M, D)
        v = v.view(N, M, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, D)
        return out(o.transpose(1, 2).reshape(N, L, H * D))  # (N, H, L, D) -> (N, L, H*D)


class TransformerBlock(nn.Module):
    """LDM's BasicTransformerBlock with joint self-attention: pre-LayerNorm attn1 (over the set), attn2 (to the
    context) and a GEGLU feed-forward, each residual.

    forward: x (N, L, C), context (N, M, C_ctx), set_size G, set_mask (G, G) bool or None, extra_context
    (N, T, C_extra) or None -> (N, L, C).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *, attn_backend: str = "auto",
                 fuse_qkv: bool = False, extra_context_dim: int | None = None):
        super().__init__()
        self.attn1 = jk.SetAttention(dim, heads, dim_head, fuse_qkv=fuse_qkv, backend=attn_backend)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, extra_context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    fused_ln: bool = False  # residual adds + LayerNorms through jedi_kernels.add_layer_norm (set_fused_ops)
    ln_backend: str = "auto"
    # with fused_ln: the out-projections' and the feed-forward output's biases folded into the add + LayerNorms
    # (set_fused_ops)
    fold_linear_bias: bool = False

    def _run_fused_ln(self, x: torch.Tensor) -> bool:
        """The fused add + LayerNorm path: inference only (training keeps torch's native LayerNorm backward), not
        while compiling (inductor fuses the adds into its own LayerNorm kernels), and with the norms' parameters in
        x's dtype outside autocast (the op takes one dtype; autocast may hand the adds mixed ones)."""
        if not self.fused_ln or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
            return False
        if any(n.weight is not None and n.weight.dtype != x.dtype for n in (self.norm1, self.norm2, self.norm3)):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _folded_biases(self, x: torch.Tensor) -> tuple:
        """(attn1's out bias, attn2's out bias, (the feed-forward output's weight, bias)), each None where it stays
        in its own layer. With ``fold_linear_bias`` (fused path only) the out-projections run without their biases,
        which the next add + LayerNorm adds as its ``shift``, and the feed-forward's output GEMM adds its product to
        the residual in place (``addmm_``, no add pass), its bias already in that residual (the third add +
        LayerNorm's ``sum_shift``). Only plain layers in x's dtype fold (a wrapped one, e.g. LoRA, keeps its
        forward)."""
        if not self.fold_linear_bias:
            return None, None, None

        def out_bias(attn):  # our own attention modules only: a subclass or wrapper may not take out_bias
            ok = (type(attn) in (jk.SetAttention, CrossAttention) and out_bias_foldable(attn.to_out)
                  and attn.to_out[0].bias.dtype == x.dtype)
            return attn.to_out[0].bias if ok else None

        ff = self.ff  # (a wrapped feed-forward may have no .net at all)
        lin = ff.net[-1] if type(ff) is FeedForward and len(ff.net) == 3 else None
        ff_ok = (lin is not None and isinstance(ff.net[0], GEGLU)
                 and type(ff.net[1]) is nn.Dropout and (ff.net[1].p == 0 or not ff.net[1].training)
                 and type(lin) is nn.Linear and lin.bias is not None and lin.weight.dtype == x.dtype
                 and lin.bias.dtype == x.dtype)
        return out_bias(self.attn1), out_bias(self.attn2), ((lin.weight, lin.bias) if ff_ok else None)

    def _attn1(self, h, set_size: int, set_mask, keep: Keep | None, out_bias: bool = True):
        kw = {} if out_bias else dict(out_bias=False)
        if keep is None:
            return self.attn1(h, set_size, set_mask, **kw)
        return self.attn1(h, set_size, set_mask, q_positions=keep.positions, **kw)

    def forward(self, x, context, set_size: int, set_mask=None, extra_context=None, keep: Keep | None = None):
        """``keep``: only those images' outputs (see :class:`Keep`): attn1's queries and everything after it run
        on them, its keys and values on every image. Returns (B*K, L, C) then."""
        if keep is not None:
            context, extra_context = keep.take_context(context), keep.take(extra_context)
        if self._run_fused_ln(x):
            n1, n2, n3, be = self.norm1, self.norm2, self.norm3, self.ln_backend
            b1, b2, ff_out = self._folded_biases(x)
            _, h = jk.add_layer_norm(x, None, n1.weight, n1.bias, n1.eps, backend=be)
            a = self._attn1(h, set_size, set_mask, keep, out_bias=b1 is None)
            x = x if keep is None else keep.take(x)
            x, h = jk.add_layer_norm(x, a, n2.weight, n2.bias, n2.eps, shift=b1, backend=be)
            a = self.attn2(h, context, extra_context, **({} if b2 is None else dict(out_bias=False)))
            x, h = jk.add_layer_norm(x, a, n3.weight, n3.bias, n3.eps, shift=b2,
                                     sum_shift=None if ff_out is None else ff_out[1], backend=be)
            if ff_out is None:
                return x + self.ff(h)
            g = self.ff.net[0](h)  # GEGLU: (N, L, 4C)
            # x is this block's own fresh sum (with the output bias in it): the GEMM accumulates into it
            x.view(-1, x.shape[-1]).addmm_(g.reshape(-1, g.shape[-1]), ff_out[0].t())
            return x
        a = self._attn1(self.norm1(x), set_size, set_mask, keep)
        x = (x if keep is None else keep.take(x)) + a
        x = x + self.attn2(self.norm2(x), context, extra_context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) -> proj_in -> TransformerBlocks over the h*w tokens -> proj_out, residual.

    proj_in/proj_out are 1x1 convs (SD v1) or Linears (``linear=True``, SD v2). proj_out starts at zero (LDM).
    forward: x (N, C, h, w), context (N, M, C_ctx), set_size G, set_mask, extra_context -> (N, C, h, w) in x's
    memory format.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, *,
                 linear: bool = False, attn_backend: str = "auto", fuse_qkv: bool = False,
                 extra_context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.linear, self.inner = linear, inner
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head, context_dim, attn_backend=attn_backend, fuse_qkv=fuse_qkv,
                              extra_context_dim=extra_context_dim)
             for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    fold_bias: bool = False  # channels-last: proj_in/proj_out as GEMMs with the bias in the epilogue (set_fused_ops)
    # with fold_bias: proj_out's GEMM without its bias, which the residual add takes (jk.residual_add; set_fused_ops)
    residual_add: bool = False
    add_backend: str = "auto"

    def _blocks(self, t, context, set_size: int, set_mask, extra_context, keep: Keep | None):
        last = len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            if keep is not None and i == last:  # the last joint attention: only the kept images go on
                t = block(t, context, set_size, set_mask, extra_context, keep=keep)
            else:
                t = block(t, context, set_size, set_mask, extra_context)
        if keep is not None and last < 0:  # no transformer block at all: select before proj_out
            t = keep.take(t)
        return t

    def forward(self, x, context, set_size: int, set_mask=None, extra_context=None, keep: Keep | None = None):
        """``keep``: the last transformer block's attn1 queries and everything after it run on those images only
        (see :class:`Keep`); returns (B*K, C, h, w) then."""
        _, _, h, w = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        t = self.norm(x)
        if keep is not None:
            x = keep.take(x)  # the residual of the kept images (in x's memory format)
        N = x.shape[0]
        if (self.fold_bias and channels_last and not self.linear and _foldable(self.proj_in)
                and _foldable(self.proj_out) and _is_pointwise(self.proj_out)):
            # the 1x1 convs as GEMMs over the tokens, biases in their epilogues (see _pointwise)
            t = _pointwise(self.proj_in, t, self.proj_in.bias).permute(0, 2, 3, 1).reshape(t.shape[0], h * w, -1)
            t = self._blocks(t, context, set_size, set_mask, extra_context, keep)
            w_out = self.proj_out.weight.reshape(self.proj_out.out_channels, -1)
            if _residual_add_ok(self, x, w_out):
                out = F.linear(t, w_out).view(N, h, w, -1).permute(0, 3, 1, 2)
                return jk.residual_add(x, out, self.proj_out.bias, backend=self.add_backend)
            return x + F.linear(t, w_out, self.proj_out.bias).view(N, h, w, -1).permute(0, 3, 1, 2)
        if not self.linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(t.shape[0], h * w, -1)  # (N, C, h, w) -> (N, L, C); free when channels-last
        if self.linear:
            t = self.proj_in(t)
        t = self._blocks(t, context, set_size, set_mask, extra_context, keep)
        if self.linear:
            t = self.proj_out(t)
        t = t.view(N, h, w, -1).permute(0, 3, 1, 2)  # (N, L, C) -> (N, C, h, w), a channels-last view
        t = t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if not self.linear:
            t = self.proj_out(t)
        return x + t


class Block(nn.ModuleList):
    """LDM's TimestepEmbedSequential: runs its layers in order, handing each the inputs it takes.

    forward: x (N, C, h, w), emb (N, E), context (N, M, C_ctx), set_size, set_mask, extra_context
    -> (N, C', h', w').
    """

    def forward(self, x, emb, context, set_size: int, set_mask=None, extra_context=None, keep: Keep | None = None):
        """``keep``: this block holds the model's last joint attention (its last SpatialTransformer's); from there on
        only those images run (see :class:`Keep`)."""
        last = -1
        if keep is not None:
            for i, layer in enumerate(self):
                if isinstance(layer, SpatialTransformer):
                    last = i
        for i, layer in enumerate(self):
            if isinstance(x, SkipCat) and not isinstance(layer, ResBlock):
                x = x.materialize()
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                if keep is not None and i == last:
                    x = layer(x, context, set_size, set_mask, extra_context, keep=keep)
                    if i < len(self) - 1:  # layers after it in this block (the UNet takes its own for later blocks)
                        emb, context, extra_context = keep.take_all(emb, context, extra_context)
                else:
                    x = layer(x, context, set_size, set_mask, extra_context)
            else:
                x = layer(x)
        return x


class JeDiUNet(nn.Module):
    """SD v1 UNet (CompVis layout and names) with JeDi's 9-channel input and joint self-attention over image sets.

    Args:
        config: :class:`UNetConfig` (``UNetConfig.sd_v1()`` for Stable Diffusion v1, ``UNetConfig.tiny()`` for
            tests).

    Plain SD (``UNetConfig(in_channels=4)``, ``cfg.plain_sd``): the forward takes x_t alone (``x0=None,
    ng_mask=None``, ``set_size`` default 1), e.g. the SD v1.x UNet as a timing peer. ``extra_context_dim`` adds
    ELITE-like extra key/value projections to every cross-attention (see :class:`CrossAttention`).

    Build big models without allocating: ``with torch.device("meta"): unet = JeDiUNet(cfg)``, then
    ``jedi.load_unet_weights(unet, path)`` materializes it from the file (no second copy), and
    ``unet.to("cuda", torch.float16)``. Weights of a fresh model follow LDM's init (the last conv of every residual
    branch and the output conv start at zero).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        # a private copy: set_fused_ops records its state here, and a config shared by several models must not
        # claim a state only one of them is in
        self.config = cfg = dataclasses.replace(config)
        self.gradient_checkpointing = cfg.use_checkpoint
        C0, E = cfg.model_channels, cfg.time_embed_dim

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_and_dim(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                      linear=cfg.use_linear_in_transformer, attn_backend=cfg.attn_backend,
                                      fuse_qkv=cfg.fuse_qkv, extra_context_dim=cfg.extra_context_dim)

        self.time_embed = TimestepEmbedding(C0, E)
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, C0, 3, padding=1)])])
        skip_channels = [C0]  # widths of the skips the decoder concatenates, in encoder order
        ch = C0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, E, mult * C0)]
                ch = mult * C0
                if cfg.has_attention(level):
                    layers.append(transformer(ch))
                self.input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != cfg.levels - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)
        self.middle_block = Block([ResBlock(ch, E, ch), transformer(ch), ResBlock(ch, E, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), E, mult * C0)]
                ch = mult * C0
                if cfg.has_attention(level):
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(C0, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        self._kv_attns: list[CrossAttention] = []  # set_fuse_context_kv
        self._emb_blocks: list[ResBlock] = []  # set_fused_ops (TimeEmb)
        # weight-derived tensors (fused q/k/v and context k/v weights, the time-embedding GEMM's weights, folded
        # sub-pixel kernels): made per forward, or once per frozen_weights() scope
        self.derived_weights = DerivedWeights()
        self._attach_derived()
        if cfg.fused_ops:
            self.set_fused_ops(True)
        if cfg.fuse_context_kv:
            self.set_fuse_context_kv(True)
        if cfg.fuse_ff:
            self.set_fuse_ff(True)

    def _attach_derived(self) -> None:
        """Hand the UNet's :class:`DerivedWeights` to the modules that keep weight-derived tensors in it."""
        for m in self.modules():
            if isinstance(m, (SetAttention, Upsample)):
                m.derived = self.derived_weights

    def frozen_weights(self):
        """A scope in which the weights do not change (e.g. one sampling run), so the tensors every forward derives
        from them are made once: each self-attention's fused q/k/v weight (``fuse_qkv``), the cross-attentions'
        fused key/value weight (``fuse_context_kv``), the time-embedding GEMM's concatenated weights and summed
        biases (``fused_ops``) and the Upsample layers' folded sub-pixel kernels: per step ≈ 0.5 GB of copies at SD
        v1's size (the H200 profile had the concatenations alone at 0.11 ms a step). Inference only (with grad
        enabled, under torch.compile or autocast every forward derives them as usual); re-entrant.

        Entering recomputes the stored tensors in place, so CUDA graphs captured in an earlier scope read current
        weights (``jedi.CUDAGraphRunner``, and so ``GraphedUNet``, refresh them before replaying such a graph outside
        any scope). Leaving raises
        RuntimeError if a parameter changed inside (its outputs used the old values); a write through ``p.data``
        has no version counter and escapes that check: change weights outside the scope.

            with torch.no_grad(), unet.frozen_weights():
                for t in timesteps:
                    eps = unet(x_t, t, context, x0=x0, ng_mask=ng_mask, set_size=G)
        """
        self._attach_derived()
        return self.derived_weights.frozen()

    def set_fused_ops(self, enabled: bool = True, backend: str = "auto") -> None:
        """Run every GroupNorm (+ the SiLU after it) and every GEGLU through the fused kernels
        (``jedi_kernels.group_norm`` / ``jedi_kernels.geglu``) and, in inference outside torch.compile, each
        transformer block's residual adds + LayerNorms through ``jedi_kernels.add_layer_norm``; or back through torch
        ops (``enabled=False``). It also folds conv biases into the adds and GEMMs that follow them (``fold_bias`` of
        ResBlock and SpatialTransformer; torch adds a cuDNN conv's bias in a pass of its own): a ResBlock's first
        conv bias joins its time embedding, which its second GroupNorm adds inside the kernel (``shift``), and all
        ResBlocks' time embeddings come from one GEMM (:class:`TimeEmb`); its second conv bias joins the 1x1 skip
        conv's bias; and on channels-last activations the 1x1 convs (skip, proj_in, proj_out) run as GEMMs with the
        bias in the epilogue. Same sums, rounded in another order. And each ``Upsample`` runs as a sub-pixel
        convolution (``subpixel``: ``jedi_kernels.upsample_conv2d``, 0.44x its FLOPs, no upsampled tensor), and the
        ResBlocks' and SpatialTransformers' residual adds take their output convs' biases (``residual_add``:
        ``jedi_kernels.residual_add``, one pass; the convs and GEMMs before them run without a bias). In inference
        the decoder's skip concatenations are never made (``skip_cat``: the ResBlock's fused GroupNorm reads both
        halves, its 1x1 skip conv runs as two GEMMs).

        Args:
            enabled: fuse (True) or restore the unfused torch modules (False).
            backend: the fused ops' backend: "auto" (Triton on CUDA, torch ops elsewhere), "triton" or "torch".

        Parameters, their names and the state dict are unchanged; the SiLU modules that follow a fused norm become
        ``nn.Identity`` (they hold no parameters). ``config.fused_ops`` records the state.
        """
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be auto|triton|torch, got {backend!r}")
        enabled = bool(enabled)
        for m in self.modules():
            if isinstance(m, nn.Sequential) and len(m) > 1 and isinstance(m[0], GroupNorm32):
                # ResBlock in_layers / out_layers and the output head: GroupNorm32, SiLU, ...
                assert isinstance(m[1], (nn.SiLU, nn.Identity)), f"unexpected {type(m[1]).__name__} after a norm"
                m[0].silu = enabled
                m[1] = nn.Identity() if enabled else nn.SiLU()
            if isinstance(m, (GroupNorm32, GEGLU)):
                m.fused, m.backend = enabled, backend
            if isinstance(m, TransformerBlock):
                m.fused_ln, m.ln_backend, m.fold_linear_bias = enabled, backend, enabled
            if isinstance(m, (ResBlock, SpatialTransformer)):
                m.fold_bias = m.residual_add = enabled
                m.add_backend = backend
            if isinstance(m, ResBlock):
                m.skip_cat = enabled
            if isinstance(m, Upsample):
                m.subpixel, m.backend = enabled, backend
        # every ResBlock's time-embedding shift in one GEMM (TimeEmb), while the biases are folded
        self._emb_blocks = [m for m in self.modules() if isinstance(m, ResBlock)] if enabled else []
        for i, m in enumerate(self._emb_blocks):
            m.emb_index = i
        self.config.fused_ops = enabled

    def set_fuse_qkv(self, enabled: bool = True) -> None:
        """Run every joint self-attention's q/k/v projections as one GEMM (True) or three (False); parameter names
        and the state dict are unchanged. ``config.fuse_qkv`` records the state."""
        enabled = bool(enabled)
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.attn1.fuse_qkv = enabled
        self.config.fuse_qkv = enabled

    def set_fuse_ff(self, enabled: bool = True) -> None:
        """Run every feed-forward's input projection and GEGLU as one kernel (``jedi_kernels.linear_geglu``: the
        (tokens, 2F) projection never reaches memory) for half-precision inference on CUDA; training, CPUs, float32
        and float64 keep the projection and the activation apart (so do blocks whose ``proj`` is wrapped). Parameter names and the state
        dict are unchanged. Opt-in: not yet measured faster on a GPU than cuBLAS + the fused GEGLU
        (benchmarks/README.md). ``config.fuse_ff`` records the state."""
        enabled = bool(enabled)
        for m in self.modules():
            if isinstance(m, GEGLU):
                m.fuse_linear = enabled
        self.config.fuse_ff = enabled

    def set_fuse_context_kv(self, enabled: bool = True) -> None:
        """Project the context to the keys and values of every cross-attention (``attn2``) of the UNet at once: one
        GEMM with the blocks' ``to_k``/``to_v`` weights concatenated (on the fly, so weight updates and CUDA graphs
        need no care), instead of two small GEMMs per block (32 for SD v1; M = batch x 77 rows each, latency-bound).
        Parameter names and the state dict are unchanged; blocks whose projections are not plain bias-free
        ``nn.Linear`` (e.g. wrapped) keep projecting for themselves. ``config.fuse_context_kv`` records the state."""
        enabled = bool(enabled)
        self._kv_attns = [m for m in self.modules() if isinstance(m, CrossAttention)] if enabled else []
        for i, m in enumerate(self._kv_attns):
            m.kv_index = i
        self.config.fuse_context_kv = enabled

    def _context_kv(self, context: torch.Tensor):
        """``context`` as a :class:`ContextKV` (one GEMM for all cross-attentions' keys and values), or unchanged
        when fewer than two blocks can share the GEMM."""
        attns = [m for m in self._kv_attns if type(m.to_k) is nn.Linear and type(m.to_v) is nn.Linear
                 and m.to_k.bias is None and m.to_v.bias is None]
        if len(attns) < 2:
            return context

        def weights():
            return [t for m in attns for t in (m.to_k.weight, m.to_v.weight)]

        # (sum 2*H*D, C_ctx): made on every call, or once per frozen_weights() scope
        w = self.derived_weights.get(("context_kv", tuple(map(id, attns))), lambda: torch.cat(weights(), dim=0),
                                     weights)
        kv = F.linear(context, w).split([m.to_k.out_features + m.to_v.out_features for m in attns], dim=-1)
        return ContextKV(context, _by_index([m.kv_index for m in attns], kv))

    def _time_emb(self, emb: torch.Tensor):
        """``emb`` as a :class:`TimeEmb` (every folding ResBlock's second-norm shift from one GEMM), or unchanged when
        fewer than two blocks can share it."""
        blocks = [m for m in self._emb_blocks if m._shift_gemm_ok()]
        if len(blocks) < 2:
            return emb
        lins = [m.emb_layers[1] for m in blocks]
        skips = [m for m in blocks if not isinstance(m.skip_connection, nn.Identity)]

        def derive():
            w = torch.cat([lin.weight for lin in lins], dim=0)  # (sum C, E)
            b = torch.cat(torch._foreach_add([lin.bias for lin in lins], [m.in_layers[2].bias for m in blocks]))
            # and the blocks' skip-path biases (1x1 skip conv + conv2) in one _foreach_add, not a tiny add each
            sb = torch._foreach_add([m.skip_connection.bias for m in skips],
                                    [m.out_layers[3].bias for m in skips]) if skips else []
            return (w, b, *sb)

        def params():
            return ([t for lin in lins for t in (lin.weight, lin.bias)] + [m.in_layers[2].bias for m in blocks]
                    + [t for m in skips for t in (m.skip_connection.bias, m.out_layers[3].bias)])

        # made on every call, or once per frozen_weights() scope
        w, b, *sb = self.derived_weights.get(("time_emb", tuple(map(id, blocks))), derive, params)
        shifts = F.linear(F.silu(emb), w, b).split([lin.out_features for lin in lins], dim=-1)
        skip_biases = _by_index([m.emb_index for m in skips], sb) if skips else ()
        return TimeEmb(emb, _by_index([m.emb_index for m in blocks], shifts), skip_biases)

    def set_attn_backend(self, backend: str) -> None:
        """Route every joint self-attention to ``backend`` ("auto", "triton", "cuda", "torch"); see
        ``jedi_kernels.set_attention``."""
        if backend not in ("auto", "triton", "cuda", "torch"):
            raise ValueError(f"backend must be auto|triton|cuda|torch, got {backend!r}")
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.attn1.backend = backend

    # ---- gradient checkpointing -----------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute every UNet block in backward (``torch.utils.checkpoint``, non-reentrant) while grad is on."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        """Store activations again (the default)."""
        self.gradient_checkpointing = False

    def _run(self, block: Block, h, emb, context, set_size, set_mask, extra_context, keep=None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, set_size, set_mask, extra_context, keep, use_reentrant=False)
        return block(h, emb, context, set_size, set_mask, extra_context, keep)

    def _last_attention_block(self) -> Block:
        """The block (in forward order) holding the last joint self-attention: the middle block at least."""
        last = self.middle_block
        for block in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            if any(isinstance(layer, SpatialTransformer) for layer in block):
                last = block
        return last

    # ---- forward ---------------------------------------------------------------------------------------------------
    def _check(self, x_t, timesteps, context, x0, ng_mask, set_size, extra_context) -> tuple[torch.Tensor, int]:
        """Validate the forward's inputs; returns (timesteps (N,), set_size)."""
        cfg = self.config
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4:
            raise ValueError(f"x_t must be a tensor of shape (N, C, h, w), got "
                             f"{tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t)}")
        N, C, h, w = x_t.shape
        if cfg.plain_sd:
            if C != cfg.in_channels:
                raise ValueError(f"x_t has {C} channels: this plain SD UNet (in_channels = out_channels = "
                                 f"{cfg.in_channels}) takes x_t with {cfg.in_channels}")
            if x0 is not None or ng_mask is not None:
                raise ValueError(f"x0 and ng_mask must be None: this UNet has in_channels = out_channels = {C} "
                                 f"(plain SD, its conv_in takes x_t alone); JeDi's input (x_t, masked x0, mask) "
                                 f"needs in_channels = {2 * C + 1}")
            if set_size is None:
                set_size = 1
        else:
            if 2 * C + 1 != cfg.in_channels:
                raise ValueError(f"x_t has {C} channels: this UNet's conv_in takes in_channels={cfg.in_channels} "
                                 f"= 2*C+1 (x_t, masked x0, mask), so x_t must have {(cfg.in_channels - 1) // 2}")
            if C != cfg.out_channels:
                raise ValueError(f"x_t has {C} channels but the UNet predicts out_channels={cfg.out_channels}")
        f = 2 ** (cfg.levels - 1)
        if N == 0 or h == 0 or w == 0 or h % f or w % f:
            raise ValueError(f"x_t spatial size ({h}, {w}) must be non-empty and divisible by 2**(levels-1) = {f}")
        if not cfg.plain_sd and (not isinstance(x0, torch.Tensor) or x0.shape != x_t.shape):
            raise ValueError(f"x0 must have x_t's shape {tuple(x_t.shape)}, got "
                             f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0)}")
        if isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 1 or N % set_size:
            raise ValueError(f"set_size must be a positive int dividing N = {N} (N = B * set_size), got {set_size!r}")
        if not cfg.plain_sd and (not isinstance(ng_mask, torch.Tensor) or ng_mask.shape != (N,)):
            raise ValueError(f"ng_mask must be a tensor of shape (N,) = ({N},), got "
                             f"{tuple(ng_mask.shape) if isinstance(ng_mask, torch.Tensor) else type(ng_mask)}")
        if (not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != N
                or context.shape[2] != cfg.context_dim or context.shape[1] == 0):
            raise ValueError(f"context must have shape (N, M, context_dim) = ({N}, M, {cfg.context_dim}), got "
                             f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context)}")
        if extra_context is not None:
            E = cfg.extra_context_dim
            if E is None:
                raise ValueError("extra_context given, but this UNet has no extra key/value projections "
                                 "(UNetConfig.extra_context_dim is None)")
            if (not isinstance(extra_context, torch.Tensor) or extra_context.dim() != 3
                    or extra_context.shape[0] != N or extra_context.shape[2] != E or extra_context.shape[1] == 0):
                got = tuple(extra_context.shape) if isinstance(extra_context, torch.Tensor) else type(extra_context)
                raise ValueError(f"extra_context must have shape (N, T, extra_context_dim) = ({N}, T, {E}), got {got}")
        if isinstance(timesteps, (int, float)) and not isinstance(timesteps, bool):
            timesteps = torch.full((N,), timesteps, device=x_t.device, dtype=torch.float32)
        if not isinstance(timesteps, torch.Tensor) or timesteps.shape not in ((), (1,), (N,)):
            raise ValueError(f"timesteps must be a number or a tensor of shape (), (1,) or (N,) = ({N},), got "
                             f"{tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps)}")
        return timesteps.reshape(-1).expand(N), set_size

    def forward(self, x_t, timesteps, context, *, x0=None, ng_mask=None, set_size: int | None = None, set_mask=None,
                extra_context=None, out_positions=None):
        """Predict the noise of every image of every set, attending jointly within each set.

        Args:
            x_t: (N, C, h, w) noisy latents, N = B * set_size, C = out_channels (4); h, w divisible by
                ``2 ** (levels - 1)`` (8 for SD v1). Contiguous or channels-last.
            timesteps: (N,), (1,) or () int/float diffusion steps (or a Python number), broadcast over N.
            context: (N, M, context_dim) text embeddings (M = 77 for CLIP; any M >= 1).
            x0: (N, C, h, w) clean latents of the references (their content is used where ng_mask is 0), x_t's dtype.
                None (required) for a plain SD UNet (``in_channels == out_channels``).
            ng_mask: (N,) bool or {0, 1} float: 1 = image to generate, 0 = reference image. None (required) for a
                plain SD UNet.
            set_size: G, images per set (required for a JeDi UNet; a plain SD UNet defaults to 1 = no joint
                attention).
            set_mask: optional bool (G, G); ``set_mask[i, j]`` lets image i attend image j. None = full joint.
            extra_context: optional (N, T, extra_context_dim) extra tokens every cross-attention also attends to
                (ELITE-like local mapping; needs ``UNetConfig.extra_context_dim``). None: the text alone.
            out_positions: optional positions within each set (strictly increasing ints in [0, set_size), e.g.
                ``range(R, G)`` for the targets after R references) whose eps to return. Every image runs up to the
                last joint self-attention, whose keys and values need them all; its queries and everything after it
                run on these images only (JeDi's sampler uses the targets' eps alone). The result equals the
                full forward's eps at those positions. None (or every position): all images.

        Returns:
            eps: (N, C, h, w) in x_t's dtype (the UNet computes in its parameters' dtype, or under autocast);
            (B*K, C, h, w) for K ``out_positions``, set-major.

        Raises:
            ValueError: naming the argument, for bad shapes, channel counts, a set_size not dividing N (or missing
                for a JeDi UNet), a spatial size not divisible by ``2 ** (levels - 1)``, a bad set_mask, x0/ng_mask
                given to a plain SD UNet, extra_context of the wrong shape or on a UNet without extra projections, or
                bad out_positions (TypeError when they are not a sequence of ints).
        """
        timesteps, set_size = self._check(x_t, timesteps, context, x0, ng_mask, set_size, extra_context)
        keep = None
        if out_positions is not None:
            try:
                positions = jk.check_set_positions(out_positions, set_size)
            except (TypeError, ValueError) as e:
                raise type(e)(f"out_positions: {e}") from None
            keep = None if positions is None else Keep(set_size, positions)
        prune = self._last_attention_block() if keep is not None else None
        dtype = self.input_blocks[0][0].weight.dtype
        if self.config.plain_sd:
            h = x_t.to(dtype)  # (N, C, h, w): plain SD, no inpainting channels
        else:
            h = jk.prepare_inputs(x_t, x0, ng_mask).to(dtype)  # (N, 2C+1, h, w)
        context = context.to(dtype)
        if self._kv_attns:
            context = self._context_kv(context)  # every block's keys and values of the context in one GEMM
        if extra_context is not None:
            extra_context = extra_context.to(dtype)
        emb = self.time_embed(timesteps)  # (N, 4C0)
        if self._emb_blocks:
            emb = self._time_emb(emb)  # every ResBlock's time-embedding shift in one GEMM
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, set_size, set_mask, extra_context, keep if block is prune else None)
            if block is prune:  # the last joint attention ran: from here on only the kept images (out_positions)
                emb, context, extra_context = keep.take_all(emb, context, extra_context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, set_size, set_mask, extra_context,
                      keep if self.middle_block is prune else None)
        if self.middle_block is prune:
            emb, context, extra_context = keep.take_all(emb, context, extra_context)
        for block in self.output_blocks:
            skip = skips.pop()
            if skip.shape[0] != h.shape[0]:  # an encoder skip from before the pruning: its kept images
                skip = keep.take(skip)
            first = block[0] if len(block) else None
            if isinstance(first, ResBlock) and first.takes_skip_cat(h, skip):
                h = SkipCat(h, skip)  # the ResBlock reads both halves in place (skip_cat)
            else:
                h = torch.cat([h, skip], dim=1)  # (N, C + C_skip, h, w)
            h = self._run(block, h, emb, context, set_size, set_mask, extra_context, keep if block is prune else None)
            if block is prune and block is not self.output_blocks[-1]:  # (self.out reads neither emb nor context)
                emb, context, extra_context = keep.take_all(emb, context, extra_context)
        return self.out(h).to(x_t.dtype)
