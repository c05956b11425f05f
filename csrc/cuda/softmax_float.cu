// Softmax family kernels for float (see cuda/softmax_epilogues.cuh).
#include "cuda/softmax_epilogues.cuh"

TORCH_VJP_SOFTMAX_INSTANTIATE(float)
