// 16-byte packs: one LDG.E.128 / STG.E.128 per pack, for any data pointer alignment.
//
// Assumptions:
//   - T is float, double, c10::Half or c10::BFloat16; a Pack<T> holds the raw bits of P = kPackElems<T> =
//     16 / sizeof(T) elements (4, 2, 8, 8), element k at byte k·sizeof(T), as they lie in memory.
//   - load_pack / store_pack take 16-byte aligned addresses only (a misaligned one is a device fault).
//   - Data pointers are aligned to their element size (torch guarantees it), so two operands differ in
//     alignment by a whole number of elements: that number is the operand's `shift` below.
//
// The pack grid. An operation over a run of elements [lo, hi) (a row, a row's chunk, a whole tensor) views
// it through a grid of 16-byte packs aligned for ONE operand, the grid operand (the output where there is
// one: every full output pack is then one aligned 128-bit store). Grid pack q holds elements
// [e0, e0 + P), e0 = q·P − off, where off = the grid operand's misalignment at element 0 of the run, in
// elements. Another operand whose own misalignment differs by `shift` elements (0 < shift < P) has no
// aligned pack there: load_grid_pack loads its two aligned packs around the grid pack and funnels them
// together (four byte-permutes), getting the second pack from the next lane by a shuffle. So every full
// grid pack of every operand is moved with 128-bit accesses; only the packs that straddle lo or hi (at most
// two per run and operand) go element by element. No access reaches outside [lo, hi).
// Indices are 32-bit and relative to a base pointer the caller places at the run's first grid pack (its
// 64-bit offset computed once per run); lo and hi may be clamped to a few packs around the packs accessed.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/plan_rows.h"

namespace torch_vjp::cuda {

// kWarpSize: cuda/plan_rows.h.
constexpr unsigned kFullMask = 0xffffffffu;

template <class T>
inline constexpr int kPackElems = 16 / static_cast<int>(sizeof(T));

template <class T>
struct alignas(16) Pack {
  static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
  uint32_t w[4];
};

// One 128-bit access each, written in PTX: with plain C++ the compiler may merge a pack store with an
// element-by-element path to the same addresses into four 32-bit stores (seen in SASS for float rows).
template <class T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  Pack<T> r;
  asm("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])
      : "l"(p)
      : "memory");  // reads memory: never merged with, or moved across, a store to the same address
  return r;
}

template <class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(pack.w[0]), "r"(pack.w[1]), "r"(pack.w[2]),
               "r"(pack.w[3])
               : "memory");
}

// ---------------------------------------------------------------------------------------------------------
// Element k of a pack in the compute type S (float for the half types, else T itself), and a pack from P
// values of S. Conversions are exact one way (T -> S) and round to nearest even the other (as c10's).
__device__ __forceinline__ float pack_elem(const Pack<float>& p, int k) { return __uint_as_float(p.w[k]); }
__device__ __forceinline__ double pack_elem(const Pack<double>& p, int k) {
  return __hiloint2double(static_cast<int>(p.w[2 * k + 1]), static_cast<int>(p.w[2 * k]));
}
__device__ __forceinline__ float pack_elem(const Pack<c10::BFloat16>& p, int k) {
  // bf16 is the top half of a float: a shift or a mask, one instruction.
  return __uint_as_float(k % 2 ? p.w[k / 2] & 0xffff0000u : p.w[k / 2] << 16);
}
__device__ __forceinline__ float pack_elem(const Pack<c10::Half>& p, int k) {
  const unsigned short bits = static_cast<unsigned short>(k % 2 ? p.w[k / 2] >> 16 : p.w[k / 2] & 0xffffu);
  return __half2float(__ushort_as_half(bits));
}

template <class T, class S>
__device__ __forceinline__ Pack<T> make_pack(const S (&v)[kPackElems<T>]) {
  Pack<T> p;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) p.w[k] = __float_as_uint(v[k]);
  } else if constexpr (sizeof(T) == 8) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      p.w[2 * k] = static_cast<uint32_t>(__double2loint(v[k]));
      p.w[2 * k + 1] = static_cast<uint32_t>(__double2hiint(v[k]));
    }
  } else {
    // Two elements per conversion instruction (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32).
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        std::memcpy(&p.w[k], &h, 4);
      } else {
        const __half2 h = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
        std::memcpy(&p.w[k], &h, 4);
      }
    }
  }
  return p;
}

// Element k of a pack set from a compute-type value (rounded as c10 rounds).
template <class T, class S>
__device__ __forceinline__ void set_pack_elem(Pack<T>& p, int k, S value) {
  if constexpr (sizeof(T) == 4) {
    p.w[k] = __float_as_uint(value);
  } else if constexpr (sizeof(T) == 8) {
    p.w[2 * k] = static_cast<uint32_t>(__double2loint(value));
    p.w[2 * k + 1] = static_cast<uint32_t>(__double2hiint(value));
  } else {
    uint32_t bits;
    if constexpr (std::is_same_v<T, c10::BFloat16>) bits = __bfloat16_as_ushort(__float2bfloat16_rn(value));
    else bits = __half_as_ushort(__float2half_rn(value));
    p.w[k / 2] = k % 2 ? (p.w[k / 2] & 0x0000ffffu) | (bits << 16) : (p.w[k / 2] & 0xffff0000u) | bits;
  }
}

// Element-wise a + b of two packs rounded to T: torch's add of two T tensors. Float and double: their own add.
// The half types: torch adds in float and rounds the sum to nearest even; float's 24 bits are at least 2p + 2
// for fp16 (p = 11) and bf16 (p = 8), so that double rounding equals the correctly rounded sum, which the packed
// instructions (add.rn.f16x2; bf16x2 on sm_80+) give directly, two elements an instruction and without
// unpacking to floats that would stay live beside the packs (that raised an fp16 norm's registers by 50).
template <class T>
__device__ __forceinline__ Pack<T> add_packs(const Pack<T>& a, const Pack<T>& b) {
  if constexpr (sizeof(T) == 2) {
    Pack<T> r;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        __nv_bfloat162 x, y;
        std::memcpy(&x, &a.w[k], 4);
        std::memcpy(&y, &b.w[k], 4);
        const __nv_bfloat162 z = __hadd2(x, y);
        std::memcpy(&r.w[k], &z, 4);
      } else {
        __half2 x, y;
        std::memcpy(&x, &a.w[k], 4);
        std::memcpy(&y, &b.w[k], 4);
        const __half2 z = __hadd2(x, y);
        std::memcpy(&r.w[k], &z, 4);
      }
    }
    return r;
  } else {
    using S = decltype(pack_elem(a, 0));
    S v[kPackElems<T>];
#pragma unroll
    for (int k = 0; k < kPackElems<T>; ++k) v[k] = pack_elem(a, k) + pack_elem(b, k);
    return make_pack<T>(v);
  }
}

template <class T, class S>
__device__ __forceinline__ Pack<T> filled_pack(S value) {
  S v[kPackElems<T>];
#pragma unroll
  for (int k = 0; k < kPackElems<T>; ++k) v[k] = value;
  return make_pack<T>(v);
}

// Misalignment of p in elements: (address / sizeof(T)) mod P.
template <class T>
inline int misalignment(const T* p) {
  return static_cast<int>((reinterpret_cast<std::uintptr_t>(p) % 16) / sizeof(T));
}

// ---------------------------------------------------------------------------------------------------------
// Shuffles of a pack (all 32 lanes must call, in warp-uniform control flow).
template <class T>
__device__ __forceinline__ Pack<T> shfl_down_pack(const Pack<T>& p, int delta) {
  Pack<T> r;
#pragma unroll
  for (int k = 0; k < 4; ++k) r.w[k] = __shfl_down_sync(kFullMask, p.w[k], delta);
  return r;
}

// The 16 bytes starting `bytes` (0..15, a multiple of sizeof(T)) into the 32 bytes a:b. Two select levels
// pick the words (the shift is the same in every thread, so these are uniform selects), then one
// PRMT per word shifts by the remaining 0 or 2 bytes (only 2-byte types can have those).
template <class T>
__device__ __forceinline__ Pack<T> funnel_pack(const Pack<T>& a, const Pack<T>& b, int bytes) {
  const uint32_t w[8] = {a.w[0], a.w[1], a.w[2], a.w[3], b.w[0], b.w[1], b.w[2], b.w[3]};
  const int words = bytes >> 2;
  uint32_t x[6], y[5];
#pragma unroll
  for (int i = 0; i < 6; ++i) x[i] = (words & 2) ? w[i + 2] : w[i];
#pragma unroll
  for (int i = 0; i < 5; ++i) y[i] = (words & 1) ? x[i + 1] : x[i];
  Pack<T> r;
  if constexpr (sizeof(T) >= 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) r.w[k] = y[k];
  } else {
    const uint32_t selector = 0x3210u + 0x1111u * static_cast<uint32_t>(bytes & 3);
#pragma unroll
    for (int k = 0; k < 4; ++k) r.w[k] = __byte_perm(y[k], y[k + 1], selector);
  }
  return r;
}

// Grid pack [e0, e0 + P) of an operand, as a pack of raw elements; elements outside [lo, hi) read as `pad`.
//   base           the operand's element 0 of the run's coordinates (the run is [lo, hi) of base[]).
//   shift          (operand misalignment − grid misalignment) mod P, the same for every thread.
//   last_in_run    this lane's neighbour (lane + 1) does not load grid pack q + 1 of the same run (the last
//                  lane of a warp or of a row group), so this lane loads that pack's first aligned half itself.
// Must be called by all 32 lanes of the warp in warp-uniform control flow when shift != 0 (a shuffle);
// lanes with nothing to load pass an empty run (lo >= hi).
template <class T, class S>
__device__ __forceinline__ Pack<T> load_grid_pack(const T* base, int e0, int lo, int hi, int shift, bool last_in_run,
                                                  S pad) {
  constexpr int P = kPackElems<T>;
  bool full;
  Pack<T> result;
  if (shift == 0) {
    full = e0 >= lo && e0 + P <= hi;
    if (full) result = load_pack(base + e0);
  } else {
    // Aligned packs [b, b + P) and [b + P, b + 2P) hold the grid pack's elements, b = e0 − shift. Each lane
    // loads the first (if inside the run), the neighbour hands over the second.
    const int b = e0 - shift;
    const bool own = b >= lo && b + P <= hi;
    const bool next = b + P >= lo && b + 2 * P <= hi;
    Pack<T> cur{};
    if (own) cur = load_pack(base + b);
    Pack<T> nxt = shfl_down_pack(cur, 1);
    if (last_in_run && next) nxt = load_pack(base + b + P);
    full = own && next;
    if (full) result = funnel_pack(cur, nxt, shift * static_cast<int>(sizeof(T)));
  }
  if (!full) {  // a pack straddling lo or hi (or wholly outside): element by element
    S v[P];
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int e = e0 + k;
      v[k] = (e >= lo && e < hi) ? static_cast<S>(base[e]) : pad;
    }
    result = make_pack<T>(v);
  }
  return result;
}

// Stores grid pack [e0, e0 + P) (values v) of the grid operand: one 128-bit store when the pack lies in
// [lo, hi), else element by element for the part that does. `aligned` false: an output off the grid's
// alignment (a second output whose misalignment differs from the first's), stored element by element.
template <class T, class S>
__device__ __forceinline__ void store_grid_pack(T* base, int e0, int lo, int hi, const S (&v)[kPackElems<T>],
                                                bool aligned = true) {
  constexpr int P = kPackElems<T>;
  if (aligned && e0 >= lo && e0 + P <= hi) {
    store_pack(base + e0, make_pack<T>(v));
  } else {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int e = e0 + k;
      if (e >= lo && e < hi) base[e] = static_cast<T>(v[k]);
    }
  }
}

// The same for a pack of raw elements (a value already in T, stored as it is).
template <class T>
__device__ __forceinline__ void store_grid_pack(T* base, int e0, int lo, int hi, const Pack<T>& p, bool aligned = true) {
  constexpr int P = kPackElems<T>;
  if (aligned && e0 >= lo && e0 + P <= hi) {
    store_pack(base + e0, p);
  } else {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int e = e0 + k;
      if (e >= lo && e < hi) base[e] = static_cast<T>(pack_elem(p, k));  // exact: p holds values of T
    }
  }
}

}  // namespace torch_vjp::cuda
