// Exact select for many partitions (rows / blocks): one CTA per partition, radix select with
// 8-bit digits (15-bit keys: 7 + 8 bits; 31-bit keys: 7 + 8 + 8 + 8) in a 256-bin shared histogram.
// Each pass re-reads the partition (L2-resident for rows of a few thousand elements). No extra
// global memory beyond the 4 × P int64 output. The first pass also counts the keys at or above the
// non-finite key (NaN/Inf) into out[3 P + p]: one compare per element it reads anyway.
#include <cstdint>

#include <cuda_runtime.h>

#include "dppa_cuda.h"
#include "keys.cuh"

namespace dppa {
namespace {

constexpr int kThreads = 256;

template <int DT, int KM>
__global__ void __launch_bounds__(kThreads) part_select_kernel(const void* __restrict__ x, int64_t n, int64_t part_len,
                                                               int64_t n_parts, const int64_t* __restrict__ k,
                                                               int scan_all, int64_t* __restrict__ out) {
  __shared__ uint32_t hist[256];
  __shared__ long long scan[kThreads];
  __shared__ long long s_krem, s_above, s_eq;
  __shared__ uint32_t s_prefix, s_mask;
  __shared__ unsigned long long s_nf;
  const int64_t p = blockIdx.x;
  const int t = threadIdx.x;
  const int64_t start = p * part_len;
  const int64_t len = min(part_len, n - start);
  const long long kk = k[p];
  constexpr bool kWide = KM == kF32Key;
  constexpr uint32_t kNonfinite = nonfinite_key(DT, KM);
  if (t == 0) s_nf = 0ull;
  if (kk <= 0) {
    if (scan_all) {  // no select needed, but the caller wants every element checked
      __syncthreads();
      unsigned long long nf = 0;
      for (int64_t i = t; i < len; i += kThreads) nf += key_at<DT, KM>(x, start + i) >= kNonfinite;
      if (nf) atomicAdd(&s_nf, nf);
      __syncthreads();
    }
    if (t == 0) {
      out[p] = kWide ? (1ll << 31) : (1ll << 15);
      out[n_parts + p] = 0;
      out[2 * n_parts + p] = 0;
      out[3 * n_parts + p] = static_cast<int64_t>(s_nf);
    }
    return;
  }
  if (t == 0) {
    s_krem = kk;
    s_above = 0;
    s_eq = 0;
    s_prefix = 0u;
    s_mask = 0u;
  }
  constexpr int kPasses = kWide ? 4 : 2;
  for (int pass = 0; pass < kPasses; ++pass) {
    const int bits = pass == 0 ? 7 : 8;
    const int shift = (kPasses - 1 - pass) * 8;
    const int nb = 1 << bits;
    hist[t] = 0u;
    __syncthreads();
    const uint32_t prefix = s_prefix, mask = s_mask;
    unsigned long long nf = 0;
    for (int64_t i = t; i < len; i += kThreads) {
      const uint32_t key = key_at<DT, KM>(x, start + i);
      if (pass == 0) nf += key >= kNonfinite;
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (nb - 1)], 1u);
    }
    if (nf) atomicAdd(&s_nf, nf);
    __syncthreads();
    // thread t owns bin nb-1-t: a prefix sum in thread order counts from the top
    const long long own = t < nb ? static_cast<long long>(hist[nb - 1 - t]) : 0;
    scan[t] = own;
    __syncthreads();
    for (int off = 1; off < kThreads; off <<= 1) {
      const long long v = t >= off ? scan[t - off] : 0;
      __syncthreads();
      scan[t] += v;
      __syncthreads();
    }
    const long long before = scan[t] - own;
    const long long krem = s_krem;
    __syncthreads();  // everyone has read s_krem before the owner updates it
    if (own > 0 && before < krem && krem <= before + own) {
      const uint32_t b = static_cast<uint32_t>(nb - 1 - t);
      s_prefix = prefix | (b << shift);
      s_mask = mask | (static_cast<uint32_t>(nb - 1) << shift);
      s_krem = krem - before;
      s_above += before;
      s_eq = own;
    }
    __syncthreads();
  }
  if (t == 0) {
    out[p] = s_prefix;
    out[n_parts + p] = s_above;
    out[2 * n_parts + p] = s_eq;
    out[3 * n_parts + p] = static_cast<int64_t>(s_nf);
  }
}

template <int DT, int KM>
cudaError_t launch_parts(const void* x, int64_t n, int64_t part_len, int64_t n_parts, const int64_t* k, int scan_all,
                         int64_t* out, cudaStream_t stream) {
  if (n_parts > 2147483647ll) return cudaErrorInvalidValue;
  part_select_kernel<DT, KM><<<static_cast<unsigned>(n_parts), kThreads, 0, stream>>>(x, n, part_len, n_parts, k,
                                                                                      scan_all, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t select_partitions(const void* x, int64_t n, int64_t part_len, int64_t n_parts, int dtype, int key_mode,
                              const int64_t* k, int scan_all, int64_t* out, cudaStream_t stream) {
  if (n_parts <= 0) return cudaSuccess;
  if (part_len <= 0) return cudaErrorInvalidValue;
  DPPA_KEY_DISPATCH(dtype, key_mode, launch_parts, x, n, part_len, n_parts, k, scan_all, out, stream)
}

}  // namespace dppa
