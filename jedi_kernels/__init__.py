"""jedi-kernels: fused set-wise flash attention and fused input preparation for JeDi.

    import jedi_kernels as jk
    o = jk.set_attention(q, k, v, set_size, heads)          # (N, L, H*D) joint attention over each set
    x_in = jk.prepare_inputs(x_t, x0, ng_mask)              # cat(x_t, x0 * (1 - m), m)
    y = jk.group_norm(x, 32, w, b, 1e-5, silu=True)         # GroupNorm(+SiLU), NHWC-friendly, two passes
    a = jk.geglu(h)                                         # h[..., :F] * gelu(h[..., F:]), one pass
    a = jk.linear_geglu(x, w, b)                            # geglu(x wᵀ + b), the projection never stored
    s, n = jk.add_layer_norm(x, r, w, b)                    # s = x + r, n = layer_norm(s), one pass
    y = jk.upsample_conv2d(x, w, b)                         # conv3x3(upsample2x(x)) as a sub-pixel conv
    y = jk.residual_add(x, r, b)                            # x + r + b[c] over (N, C, H, W), one pass
    t = jk.take_set_positions(x, set_size, (1,))            # image 1 of every set, in x's memory format
"""
from jedi_kernels import _ext  # noqa: F401  (imports torch, then _C)
from jedi_kernels.backends import available_backends
from jedi_kernels.functional import (add_layer_norm, check_set_positions, geglu, group_norm, linear_geglu,
                                     prepare_inputs, sample_ng_mask, set_attention, take_set_positions,
                                     residual_add, upsample_conv2d)
from jedi_kernels.modules import SetAttention
from jedi_kernels.reference import (
    add_layer_norm_reference,
    geglu_reference,
    group_norm_reference,
    linear_geglu_reference,
    prepare_inputs_reference,
    set_attention_reference,
    residual_add_reference,
    upsample_conv2d_reference,
)

__version__ = "0.1.0"

__all__ = [
    "set_attention",
    "prepare_inputs",
    "sample_ng_mask",
    "group_norm",
    "geglu",
    "linear_geglu",
    "add_layer_norm",
    "upsample_conv2d",
    "residual_add",
    "take_set_positions",
    "check_set_positions",
    "SetAttention",
    "available_backends",
    "set_attention_reference",
    "prepare_inputs_reference",
    "group_norm_reference",
    "geglu_reference",
    "linear_geglu_reference",
    "add_layer_norm_reference",
    "upsample_conv2d_reference",
    "residual_add_reference",
]
