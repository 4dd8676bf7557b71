// Set-attention bwd instance for head dim 40 (kernel head dim 48: float16 and bfloat16). One instance per file so
// nvcc compiles them in parallel.
#include "set_attention_kernels.cuh"

JEDI_SET_ATTN_INSTANTIATE_BWD(48)
