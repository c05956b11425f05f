// Exact GELU's half-type CUDA formula (csrc/math/gelu_fast.h) evaluated on the host, for the accuracy
// check of benchmarks/gelu_accuracy.py: for every finite bf16 and fp16 value x (as float), f = x Φ(x) and
// f' = Φ(x) + x φ(x), with the hardware's approximate exp2 and reciprocal replaced by exact ones
// pushed to the edge of the hardware's error bound (ex2.approx: 2^-22 relative, flushing results below 2^-126
// to 0; rcp.approx: 2^-23 relative), in each direction and not at all. Writes float32 records
// (dtype: 0 bf16, 1 fp16; variant 0-4; x; f; f') to stdout, binary.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "math/gelu_fast.h"

template <int kExpDir, int kRcpDir>
struct HostApprox {
  static float exp2(float x) {
    const double y = std::exp2(double(x)) * (1.0 + kExpDir * std::ldexp(1.0, -22));
    return y < std::ldexp(1.0, -126) ? 0.0f : float(y);
  }
  static float rcp(float x) { return float((1.0 / double(x)) * (1.0 + kRcpDir * std::ldexp(1.0, -23))); }
};

static float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static float half_to_float(uint16_t h) {  // IEEE binary16 -> float, exact
  const int sign = h >> 15, exponent = (h >> 10) & 31, mantissa = h & 1023;
  float v = exponent == 0 ? std::ldexp(float(mantissa), -24)
                          : exponent == 31 ? (mantissa ? NAN : INFINITY) : std::ldexp(float(mantissa | 1024), exponent - 25);
  return sign ? -v : v;
}

template <class Approx>
static void run(int variant, const std::vector<float> (&xs)[2]) {
  const torch_vjp::math::GeluFast<Approx> gelu;
  for (int dtype = 0; dtype < 2; ++dtype) {
    for (const float x : xs[dtype]) {
      float f, df;
      gelu.value_and_slope(x, f, df);
      const float rec[5] = {float(dtype), float(variant), x, f, df};
      std::fwrite(rec, sizeof(float), 5, stdout);
    }
  }
}

int main() {
  std::vector<float> xs[2];  // every finite bf16, every finite fp16
  for (uint32_t b = 0; b < 65536; ++b) {
    const float bf = from_bits(b << 16), hf = half_to_float(uint16_t(b));
    if (std::isfinite(bf)) xs[0].push_back(bf);
    if (std::isfinite(hf)) xs[1].push_back(hf);
  }
  run<HostApprox<0, 0>>(0, xs);
  run<HostApprox<1, 1>>(1, xs);
  run<HostApprox<1, -1>>(2, xs);
  run<HostApprox<-1, 1>>(3, xs);
  run<HostApprox<-1, -1>>(4, xs);
  return 0;
}
