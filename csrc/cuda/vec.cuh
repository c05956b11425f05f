// 16-byte vectorised global loads and stores (one ld/st.global.v4 per Pack).
//
// Assumptions:
//   - T is float, double, c10::Half or c10::BFloat16: trivially copyable, and sizeof(T) divides 16, so a
//     Pack<T> holds kPackElems<T> = 16 / sizeof(T) elements (4, 2, 8, 8) and has no padding.
//   - load_pack / store_pack are only called on addresses that are multiples of 16 bytes: the base
//     pointer passed the can_vectorize check and the element offset is a multiple of kPackElems<T>.
//     A misaligned address is undefined behaviour on the device (misaligned address error), not a slow path.
//   - Callers handle the tail (numel not a multiple of kPackElems<T>) with scalar accesses.
#pragma once

#include <cstdint>

namespace torch_vjp::cuda {

template <class T>
inline constexpr int kPackElems = 16 / static_cast<int>(sizeof(T));

template <class T>
struct alignas(16) Pack {
  static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
  T v[kPackElems<T>];
};

template <class T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  *reinterpret_cast<Pack<T>*>(p) = pack;
}

template <class T>
__device__ __forceinline__ Pack<T> filled_pack(T value) {
  Pack<T> p;
#pragma unroll
  for (int k = 0; k < kPackElems<T>; ++k) p.v[k] = value;
  return p;
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// True when every pointer is 16-byte aligned (base pointers only: offsets are the caller's business).
template <class... Ts>
bool can_vectorize(const Ts*... ptrs) {
  return (is_aligned16(ptrs) && ...);
}

}  // namespace torch_vjp::cuda
