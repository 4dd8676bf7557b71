// Set-attention fwd instances for the other head dims (every multiple of 8 up to 256 runs on the smallest of these
// kernel head dims that is >= D, padded columns zero-filled): 32, 64, 96, 128, 192, 256.
#include "set_attention_kernels.cuh"

JEDI_SET_ATTN_INSTANTIATE_FWD(32)
JEDI_SET_ATTN_INSTANTIATE_FWD(64)
JEDI_SET_ATTN_INSTANTIATE_FWD(96)
JEDI_SET_ATTN_INSTANTIATE_FWD(128)
JEDI_SET_ATTN_INSTANTIATE_FWD(192)
JEDI_SET_ATTN_INSTANTIATE_FWD(256)
