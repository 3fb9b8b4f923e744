// Magnitude keys on the device (reference.threshold): bits of x rounded to the key dtype, sign cleared.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>

#include "dppa_cuda.h"

namespace dppa {

// Raw bits of element i (16 or 32 bits, zero-extended).
template <int DT>
__device__ __forceinline__ uint32_t raw_at(const void* x, int64_t i) {
  if constexpr (DT == kF32) {
    return static_cast<const uint32_t*>(x)[i];
  } else {
    return static_cast<const uint16_t*>(x)[i];
  }
}

template <int DT>
__device__ __forceinline__ float raw_to_float(uint32_t raw) {
  if constexpr (DT == kF32) {
    return __uint_as_float(raw);
  } else if constexpr (DT == kBF16) {
    return __uint_as_float(raw << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
  }
}

template <int DT, int KM>
__device__ __forceinline__ uint32_t key_of_raw(uint32_t raw) {
  if constexpr (KM == kNative16) {
    static_assert(DT != kF32, "native 16-bit keys need a 16-bit dtype");
    return raw & 0x7FFFu;
  } else if constexpr (KM == kF32Key) {
    return __float_as_uint(raw_to_float<DT>(raw)) & 0x7FFFFFFFu;
  } else if constexpr (KM == kBF16Key) {
    // round-to-nearest-even on the integer bits, like torch; a NaN becomes torch's quiet NaN
    // (key 0x7FC0), so the carry never reaches bit 15
    uint32_t u = __float_as_uint(raw_to_float<DT>(raw)) & 0x7FFFFFFFu;
    u = u > 0x7F800000u ? 0x7FC00000u : u;
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  } else {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(raw_to_float<DT>(raw)))) & 0x7FFFu;
  }
}

template <int DT, int KM>
__device__ __forceinline__ uint32_t key_at(const void* x, int64_t i) {
  return key_of_raw<DT, KM>(raw_at<DT>(x, i));
}

// Runtime (dtype, key mode) -> FN<DT, KM>(args...); invalid pairs return cudaErrorInvalidValue.
#define DPPA_KEY_DISPATCH(DTYPE, KMODE, FN, ...)                                           \
  switch ((DTYPE) * 4 + (KMODE)) {                                                       \
    case kBF16 * 4 + kNative16: return FN<kBF16, kNative16>(__VA_ARGS__);                \
    case kF16 * 4 + kNative16: return FN<kF16, kNative16>(__VA_ARGS__);                  \
    case kF32 * 4 + kF32Key: return FN<kF32, kF32Key>(__VA_ARGS__);                      \
    case kBF16 * 4 + kF32Key: return FN<kBF16, kF32Key>(__VA_ARGS__);                    \
    case kF16 * 4 + kF32Key: return FN<kF16, kF32Key>(__VA_ARGS__);                      \
    case kF32 * 4 + kBF16Key: return FN<kF32, kBF16Key>(__VA_ARGS__);                    \
    case kF16 * 4 + kBF16Key: return FN<kF16, kBF16Key>(__VA_ARGS__);                    \
    case kF32 * 4 + kF16Key: return FN<kF32, kF16Key>(__VA_ARGS__);                      \
    case kBF16 * 4 + kF16Key: return FN<kBF16, kF16Key>(__VA_ARGS__);                   \
    default: return cudaErrorInvalidValue;                                               \
  }

inline int key_bits(int key_mode) { return key_mode == kF32Key ? 31 : 15; }

// The smallest key of a NaN/Inf (+Inf's key; NaN keys lie above) for x of dtype DT in key mode KM.
// Every non-finite x has a key at or above it; a finite x only when it overflows a narrower key.
__host__ __device__ constexpr uint32_t nonfinite_key(int dtype, int key_mode) {
  return key_mode == kF32Key ? 0x7F800000u
         : (key_mode == kF16Key || (key_mode == kNative16 && dtype == kF16)) ? 0x7C00u
                                                                             : 0x7F80u;
}

}  // namespace dppa
