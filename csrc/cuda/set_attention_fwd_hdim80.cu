// Set-attention fwd instance for head dim 80 (kernel head dim 80: float16 and bfloat16). One instance per file so
// nvcc compiles them in parallel.
#include "set_attention_kernels.cuh"

JEDI_SET_ATTN_INSTANTIATE_FWD(80)
