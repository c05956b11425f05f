// Normalization family kernels for double (see cuda/norm_epilogues.cuh).
#include "cuda/norm_epilogues.cuh"

TORCH_VJP_NORM_INSTANTIATE(double)
