// TVJP_HD marks the math shared by both backends: host and device under nvcc, always inlined on the CPU (its
// loops call these once per vector, and a call per vector costs more than the math). Its own header, free of
// ATen, so that math compiled alone for the host (gelu_fast.h in benchmarks/gelu_host.cpp) shares it.
#pragma once

#if defined(__CUDACC__)
#define TVJP_HD __host__ __device__ __forceinline__
#else
#define TVJP_HD inline __attribute__((always_inline))
#endif
