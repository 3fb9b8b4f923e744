// Shared definitions of the CPU backend: dtype codes, exact conversions, magnitude keys, the
// counter-based hash RNG, partitions, and the entry points bound in bindings.cpp.
//
// Everything works on raw pointers handed over from Python (no torch headers): the Python wrapper
// (dppa_kernels/backends/cpu.py) makes tensors contiguous and allocates every output.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../vocab.h"  // dtype, plan-kind, tie-mode and combine codes; limits

namespace dppa {

inline void check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("dppa_kernels._cpu internal invariant: ") + what);
}

inline int key_bits(int dtype) { return dtype == kF32 ? 31 : 15; }

// The smallest magnitude key of a non-finite value in key dtype KD: +Inf's bits; NaN keys lie above.
// Every non-finite input gets a key at or above it in every key dtype (mag_key below); a finite
// input can too only when it overflows a narrower key dtype.
template <int KD>
constexpr uint32_t nonfinite_key() {
  return KD == kF32 ? 0x7F800000u : KD == kBF16 ? 0x7F80u : 0x7C00u;
}

// Below this many elements a call runs on the calling thread: waking an OpenMP team (and waiting
// at its barrier for a thread that lost its core) costs more than the work. Measured on 2 cores
// (bench/bench_cpu.py --threads-sweep): a 2-model merge gains from a second thread from 32 Ki
// elements; below that the apply pass is one chunk (>= 16 Ki elements each) anyway.
constexpr int64_t kSerialBelow = int64_t(1) << 15;

// ---------------------------------------------------------------------------------------------
// Conversions. All exact or round-to-nearest-even, as torch's .to(dtype) (no FP contraction: the
// extension is compiled with -ffp-contract=off).

inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// fp32 -> bf16 round-to-nearest-even (torch's c10::BFloat16 rounding); NaN stays a quiet NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((b >> 16) | 0x0040u);
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

#if defined(__FLT16_MAX__)
// the compiler's _Float16 converts with IEEE round-to-nearest-even (vcvtps2ph with F16C)
inline float f16_to_f32(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return float(v);
}
inline uint16_t f32_to_f16(float f) {
  _Float16 v = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
#else
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_to_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {  // zero or subnormal: m * 2^-24 is exact in fp32
    float v = float(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t f32_to_f16(float f) {
  uint32_t b = f32_to_bits(f), sign = (b >> 16) & 0x8000u, a = b & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u);
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                     // below 2^-14: subnormal or zero
    if (a < 0x33000000u) return uint16_t(sign);             // < 2^-25 rounds to 0
    uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - e;  // m * 2^(e-150) / 2^-24 = m >> (126 - e)
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15, keep 23-bit mantissa
  r = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  return uint16_t(sign | r);
}
#endif

// Load element i of a bf16/fp16/fp32 buffer as fp32 (exact).
template <int D>
inline float load_f32(const void* p, int64_t i) {
  if constexpr (D == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else if constexpr (D == kF16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else return static_cast<const float*>(p)[i];
}

template <int D>
inline void store_from_f32(void* p, int64_t i, float v) {
  if constexpr (D == kBF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else if constexpr (D == kF16) static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  else static_cast<float*>(p)[i] = v;
}

// Magnitude key of element i of a D buffer rounded to KD: the bit pattern with the sign cleared.
template <int D, int KD>
inline uint32_t mag_key(const void* p, int64_t i) {
  if constexpr (D == KD) {
    if constexpr (D == kF32) return static_cast<const uint32_t*>(p)[i] & 0x7FFFFFFFu;
    else return static_cast<const uint16_t*>(p)[i] & 0x7FFFu;
  } else if constexpr (D == kF32 && KD == kBF16) {
    // rounding on the magnitude bits: the carry never reaches the sign bit for finite input, and
    // a NaN becomes the quiet NaN torch rounds it to (key 0x7FC0)
    uint32_t a = static_cast<const uint32_t*>(p)[i] & 0x7FFFFFFFu;
    a = a > 0x7F800000u ? 0x7FC00000u : a;
    return (a + 0x7FFFu + ((a >> 16) & 1u)) >> 16;
  } else {
    float v = load_f32<D>(p, i);
    if constexpr (KD == kF32) return f32_to_bits(v) & 0x7FFFFFFFu;
    else if constexpr (KD == kBF16) return f32_to_bf16(v) & 0x7FFFu;
    else return f32_to_f16(v) & 0x7FFFu;
  }
}

// Runtime (D, KD) -> template dispatch. F is a generic lambda taking two integral_constants.
template <int D, class F>
inline auto dispatch_kd(int kd, F&& f) {
  switch (kd) {
    case kBF16: return f(std::integral_constant<int, D>{}, std::integral_constant<int, kBF16>{});
    case kF16: return f(std::integral_constant<int, D>{}, std::integral_constant<int, kF16>{});
    case kF32: return f(std::integral_constant<int, D>{}, std::integral_constant<int, kF32>{});
  }
  throw std::runtime_error("dppa_kernels._cpu: bad key dtype code");
}
template <class F>
inline auto dispatch_d_kd(int d, int kd, F&& f) {
  switch (d) {
    case kBF16: return dispatch_kd<kBF16>(kd, f);
    case kF16: return dispatch_kd<kF16>(kd, f);
    case kF32: return dispatch_kd<kF32>(kd, f);
  }
  throw std::runtime_error("dppa_kernels._cpu: bad dtype code");
}
template <class F>
inline auto dispatch_d(int d, F&& f) {
  switch (d) {
    case kBF16: return f(std::integral_constant<int, kBF16>{});
    case kF16: return f(std::integral_constant<int, kF16>{});
    case kF32: return f(std::integral_constant<int, kF32>{});
  }
  throw std::runtime_error("dppa_kernels._cpu: bad dtype code");
}

// ---------------------------------------------------------------------------------------------
// Counter-based hash RNG (reference/rng.py): identical bits on every backend and thread count.

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}
inline uint32_t rng_bits(uint64_t i, uint32_t k1, uint32_t k2) {
  return fmix32(fmix32(uint32_t(i) ^ k1) ^ k2 ^ (uint32_t(i >> 32) * 0x9E3779B9u));
}

// ---------------------------------------------------------------------------------------------
// Partitions of the flat index range: P partitions of length L (the last may be shorter).
// "tensor" is L = n; "row" is L = last dim; "block" is L = block size.
struct Parts {
  int64_t n, L, P;
  int64_t start(int64_t p) const { return p * L; }
  int64_t len(int64_t p) const { return (p + 1) * L <= n ? L : n - p * L; }
};

// Threads for a call over n elements: nthreads (0: OpenMP's default), 1 below kSerialBelow;
// nthreads < 0: exactly -nthreads (bench_cpu.py --threads-sweep measures the rule with it).
int resolve_threads(int nthreads, int64_t n);

// ---------------------------------------------------------------------------------------------
// Entry points (select.cpp, apply.cpp)

// Returns whether some key it read was non-finite (>= nonfinite_key): free from its histograms.
// With scan_all, partitions with k = 0 (which need no select) are scanned for such keys too.
bool select(uintptr_t x, int dtype, int64_t n, int64_t L, int key_dtype, uintptr_t k, uintptr_t tau,
            uintptr_t c_above, uintptr_t c_eq, bool scan_all, int nthreads);
void histogram(uintptr_t x, int dtype, int64_t n, int key_dtype, uintptr_t out, int nthreads);
void della_mask(uintptr_t x, int dtype, int64_t n, int64_t cols, double density, double epsilon,
                uint32_t k1, uint32_t k2, uintptr_t out, int nthreads);

// One model of the fused apply pass, flattened from ApplyPlan by the Python wrapper.
struct PlanDesc {
  int kind = 0;  // 0 dense, 1 thresholds, 2 dare, 3 mask
  uintptr_t data = 0;
  int dtype = kBF16;
  double scale = 1.0;
  double weight = 1.0;
  // thresholds
  int64_t L = 0;          // partition length
  int key_dtype = kBF16;  // dtype the key is taken in
  int tie_mode = 0;       // 0 exact_k, 1 ge, 2 gt
  int K = 1;              // levels
  uintptr_t tau = 0;      // int64 [P, K]
  uintptr_t budget = 0;   // int64 [P, K] (exact_k)
  uintptr_t c_eq = 0;     // int64 [P, K] (exact_k)
  std::vector<double> factors;
  // dare
  uint32_t k1 = 0, k2 = 0;
  uint64_t thr32 = 0;
  // mask
  uintptr_t mask = 0;  // bool/uint8 [n]
};

// combine, elect, divisor: the Combine, Elect and Divisor codes of vocab.h. sum_divisor: the
// precomputed divisor of combine "sum".
struct CombineDesc {
  int combine = kCombineSum, elect = kElectWeightedSum, divisor = kDivWeights;
  bool normalize = false;
  double lam = 1.0;
  double sum_divisor = 1.0;
};

// With check_finite, returns whether a fp32 result (before the cast) was NaN/Inf: the trace every
// non-finite input leaves (apply.cpp). Without, returns false.
bool apply(const std::vector<PlanDesc>& plans, uintptr_t base, int base_dtype, const CombineDesc& comb,
           uintptr_t out, int out_dtype, int64_t n, bool check_finite, int nthreads);
std::vector<double> abs_sums(const PlanDesc& plan, int64_t n, int nthreads);

}  // namespace dppa
