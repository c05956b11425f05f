// Normalization family kernels for float (see cuda/norm_epilogues.cuh).
#include "cuda/norm_epilogues.cuh"

TORCH_VJP_NORM_INSTANTIATE(float)
