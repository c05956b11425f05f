// Softmax family kernels for c10::BFloat16 (see cuda/softmax_epilogues.cuh).
#include "cuda/softmax_epilogues.cuh"

TORCH_VJP_SOFTMAX_INSTANTIATE(c10::BFloat16)
