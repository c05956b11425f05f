// Softmax family kernels for double (see cuda/softmax_epilogues.cuh).
#include "cuda/softmax_epilogues.cuh"

TORCH_VJP_SOFTMAX_INSTANTIATE(double)
