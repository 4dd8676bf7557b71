"""The CUDA Hopper (wgmma) set-attention forward's variants, and the mma.sync forward's rows per warp by shape, as the
C++ sources define them, for the Python side.

``JEDI_CUDA_FWD_WGMMA=n`` picks variant n (0: the mma.sync kernel). The benchmarks name each variant by its tile,
``wg<keys per tile>x<warpgroups per CTA>``, time the ones compiled for a head dim, and compare them with the default.
The source of truth is C++: ``wgmma_variant_block_n``, ``wgmma_variant_warpgroups`` and ``wgmma_variant_compiled`` in
csrc/cuda/set_attention_wgmma.cuh, ``kDefaultWgmmaVariant`` in csrc/cuda/set_attention_glue.cpp.
The rows per warp come from ``padded_head_dim``, ``fwd_default_row_blocks`` and ``fwd_shape_row_blocks`` in
csrc/cuda/set_attention_plan.h. tests/kernels/test_ext_sources.py compiles the headers on the host and checks these
tables against them.
"""
from __future__ import annotations

# variant -> (keys per tile, warpgroups of 64 query rows per CTA)
WGMMA_VARIANTS: dict[int, tuple[int, int]] = {1: (64, 2), 2: (128, 2), 3: (128, 3), 4: (128, 1), 5: (64, 1)}
# head dim -> the variants compiled for it (the others fall back to the mma.sync kernel)
WGMMA_COMPILED: dict[int, tuple[int, ...]] = {40: (1, 2, 3, 4, 5), 80: (1, 2, 5), 160: (1,)}
# head dim -> the variant run when JEDI_CUDA_FWD_WGMMA is unset (on sm_90, unless another CUDA forward switch asks
# for an mma.sync instance); head dims not listed run the mma.sync kernel
WGMMA_DEFAULT: dict[int, int] = {40: 1}


def wgmma_label(variant: int) -> str:
    """The benchmarks' name of a variant: ``wg<keys per tile>x<warpgroups>`` ("wg64x2" for 1); "mmasync" for 0."""
    if variant == 0:
        return "mmasync"
    block_n, warpgroups = WGMMA_VARIANTS[variant]
    return f"wg{block_n}x{warpgroups}"


def wgmma_labels(head_dim: int) -> dict[str, str]:
    """{label: JEDI_CUDA_FWD_WGMMA value} of the variants compiled for ``head_dim`` (empty where none is)."""
    return {wgmma_label(v): str(v) for v in WGMMA_COMPILED.get(head_dim, ())}


def default_label(head_dim: int) -> str:
    """The label of what runs at ``head_dim`` with the switch unset: the default variant, or "mmasync"."""
    return wgmma_label(WGMMA_DEFAULT.get(head_dim, 0))


# the head dims of the compiled kernel instances (a head dim runs on the smallest instance >= it)
INSTANCE_HEAD_DIMS: tuple[int, ...] = (32, 48, 64, 80, 96, 128, 160, 192, 256)


def padded_head_dim(head_dim: int) -> int:
    """The kernel instance serving ``head_dim`` (a positive multiple of 8, <= 256), or 0 when none does."""
    if head_dim <= 0 or head_dim % 8:
        return 0
    return next((d for d in INSTANCE_HEAD_DIMS if d >= head_dim), 0)


def rows_per_warp_default(head_dim: int, set_keys: int) -> int:
    """The mma.sync forward's query rows per warp when JEDI_CUDA_FWD_ROW_BLOCKS is unset, for sets of ``set_keys``
    keys (set size x L): 32 up to padded head dim 80, and at 160 for sets of more than 1024 keys; 16 elsewhere."""
    kd = padded_head_dim(head_dim)
    return 32 if kd <= 80 or (kd == 160 and set_keys > 1024) else 16
