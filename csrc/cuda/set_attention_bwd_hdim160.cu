// Set-attention bwd instance for head dim 160 (kernel head dim 160: float16 and bfloat16). One instance per file so
// nvcc compiles them in parallel.
#include "set_attention_kernels.cuh"

JEDI_SET_ATTN_INSTANTIATE_BWD(160)
