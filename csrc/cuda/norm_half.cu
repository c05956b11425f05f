// Normalization family kernels for c10::Half (see cuda/norm_epilogues.cuh).
#include "cuda/norm_epilogues.cuh"

TORCH_VJP_NORM_INSTANTIATE(c10::Half)
