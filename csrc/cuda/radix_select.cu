// Grid-wide exact select of one partition and the 32768-bin histogram: one shared-memory pass for
// 16-bit keys, a multi-pass radix with candidate compaction for fp32 keys.
//
// radix_hist: persistent grid, one shared-memory histogram of 2^bits uint32 bins per CTA (128 KB
// for the 15-bit key: 1 CTA/SM), 16-byte vector loads, one shared atomicAdd per element whose
// decided high bits match the state's prefix, one global atomic per non-zero bin at the end.
// radix_choose: one CTA scans the bins from the top (block-wide prefix sum over per-thread
// ranges), picks the digit of the k_rem-th largest key and updates the state on the device, so
// consecutive passes need no host round trip.
// 16-bit keys: one pass (≈ one read). fp32 keys: digits of 11/11/9 bits, three reads (no
// candidate compaction yet). Extra memory: the 32768 × 8 B histogram and 5 int64 of state.
// NaN/Inf: the first pass's digits at or above the non-finite key's (Inf's key has zero low bits
// in both plans) count them for free; select_tensor reports the count as out[3].
#include <cstdint>

#include <cuda_runtime.h>

#include "dppa_cuda.h"
#include "keys.cuh"

namespace dppa {
namespace {

constexpr int kHistThreads = 1024;
constexpr int kChooseThreads = 1024;

template <int DT, int KM>
__global__ void __launch_bounds__(kHistThreads) radix_hist_kernel(const void* __restrict__ x, int64_t n,
                                                                   const int64_t* __restrict__ state, int shift,
                                                                   int bits, unsigned long long* __restrict__ hist) {
  extern __shared__ uint32_t sh[];
  const int nb = 1 << bits;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) sh[b] = 0u;
  const uint32_t prefix = state ? static_cast<uint32_t>(state[0]) : 0u;
  const uint32_t mask = state ? static_cast<uint32_t>(state[1]) : 0u;
  const uint32_t dmask = static_cast<uint32_t>(nb - 1);
  __syncthreads();

  constexpr int kElem = DT == kF32 ? 4 : 2;
  constexpr int kVec = 16 / kElem;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  const int64_t nv = aligned ? n / kVec : 0;
  const uint4* xv = static_cast<const uint4*>(x);
  for (int64_t v = tid; v < nv; v += stride) {
    const uint4 w = xv[v];
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t raw = kElem == 4 ? words[j] : (words[j / 2] >> (16 * (j % 2))) & 0xFFFFu;
      const uint32_t key = key_of_raw<DT, KM>(raw);
      if ((key & mask) == prefix) atomicAdd(&sh[(key >> shift) & dmask], 1u);
    }
  }
  for (int64_t i = nv * kVec + tid; i < n; i += stride) {
    const uint32_t key = key_at<DT, KM>(x, i);
    if ((key & mask) == prefix) atomicAdd(&sh[(key >> shift) & dmask], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    const uint32_t c = sh[b];
    if (c) atomicAdd(&hist[b], static_cast<unsigned long long>(c));
  }
}

template <int DT, int KM>
cudaError_t launch_hist(const void* x, int64_t n, const int64_t* state, int shift, int bits,
                        unsigned long long* hist, cudaStream_t stream) {
  int dev = 0, sms = 1;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const size_t smem = sizeof(uint32_t) << bits;
  err = cudaFuncSetAttribute(radix_hist_kernel<DT, KM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  // small inputs: fewer CTAs, since zeroing and flushing 2^bits bins per CTA costs more than the data
  const int64_t per_cta = static_cast<int64_t>(kHistThreads) * 64;
  const int64_t want = (n + per_cta - 1) / per_cta;
  const int per_sm = bits >= 14 ? 1 : 2;
  const int blocks = static_cast<int>(want < 1 ? 1 : (want < sms * per_sm ? want : sms * per_sm));
  radix_hist_kernel<DT, KM><<<blocks, kHistThreads, smem, stream>>>(x, n, state, shift, bits, hist);
  return cudaGetLastError();
}

// nf_digit >= 0: also add the keys in digits >= nf_digit (the first pass's non-finite keys) to
// state[4]; the final pass copies state[4] to out[3].
__global__ void __launch_bounds__(kChooseThreads) radix_choose_kernel(unsigned long long* __restrict__ hist,
                                                                      int shift, int bits,
                                                                      int64_t* __restrict__ state, int final_pass,
                                                                      int64_t nf_digit, int64_t* __restrict__ out) {
  __shared__ long long scan[kChooseThreads];
  const int nb = 1 << bits;
  const int t = threadIdx.x;
  const int per = (nb + kChooseThreads - 1) / kChooseThreads;
  // thread t owns bins [lo, hi), thread 0 the highest: a prefix sum in thread order counts from the top
  const int hi = max(nb - t * per, 0);
  const int lo = max(hi - per, 0);
  const long long k_rem = state[2];
  long long own = 0, own_nf = 0;
  for (int b = hi - 1; b >= lo; --b) {
    own += static_cast<long long>(hist[b]);
    if (nf_digit >= 0 && b >= nf_digit) own_nf += static_cast<long long>(hist[b]);
  }
  if (own_nf) atomicAdd(reinterpret_cast<unsigned long long*>(state + 4), static_cast<unsigned long long>(own_nf));
  scan[t] = own;
  __syncthreads();
  for (int off = 1; off < kChooseThreads; off <<= 1) {
    const long long v = t >= off ? scan[t - off] : 0;
    __syncthreads();
    scan[t] += v;
    __syncthreads();
  }
  const long long before = scan[t] - own;  // keys (with the prefix) strictly above my bins
  if (own > 0 && before < k_rem && k_rem <= before + own) {
    long long c = before;
    for (int b = hi - 1; b >= lo; --b) {
      const long long h = static_cast<long long>(hist[b]);
      if (c + h >= k_rem) {
        const int64_t prefix = state[0] | (static_cast<int64_t>(b) << shift);
        const int64_t above = state[3] + c;
        state[0] = prefix;
        state[1] |= static_cast<int64_t>(nb - 1) << shift;
        state[2] = k_rem - c;
        state[3] = above;
        if (final_pass) {
          out[0] = prefix;
          out[1] = above;
          out[2] = h;
        }
        break;
      }
      c += h;
    }
  }
  __syncthreads();  // every thread's state[4] update is visible to thread 0
  if (final_pass && t == 0) out[3] = state[4];
  for (int b = lo; b < hi; ++b) hist[b] = 0ull;  // ready for the next pass
}

__global__ void radix_init_kernel(int64_t* state, int64_t k) {
  state[0] = 0;
  state[1] = 0;
  state[2] = k;
  state[3] = 0;
  state[4] = 0;
}

}  // namespace

cudaError_t radix_hist(const void* x, int64_t n, int dtype, int key_mode, const int64_t* state, int shift,
                       int bits, unsigned long long* hist, cudaStream_t stream) {
  if (bits < 1 || bits > 15 || shift < 0 || shift > 31) return cudaErrorInvalidValue;
  if (n <= 0) return cudaSuccess;
  DPPA_KEY_DISPATCH(dtype, key_mode, launch_hist, x, n, state, shift, bits, hist, stream)
}

cudaError_t radix_choose(unsigned long long* hist, int shift, int bits, int64_t* state, int final_pass,
                         int64_t nf_digit, int64_t* out, cudaStream_t stream) {
  radix_choose_kernel<<<1, kChooseThreads, 0, stream>>>(hist, shift, bits, state, final_pass, nf_digit, out);
  return cudaGetLastError();
}

cudaError_t radix_init(int64_t* state, int64_t k, cudaStream_t stream) {
  radix_init_kernel<<<1, 1, 0, stream>>>(state, k);
  return cudaGetLastError();
}

cudaError_t select_tensor(const void* x, int64_t n, int dtype, int key_mode, int64_t k,
                          unsigned long long* hist, int64_t* state, int64_t* out, cudaStream_t stream) {
  // (shift, bits) of each pass, most significant digit first
  static const int kPlan16[1][2] = {{0, 15}};
  static const int kPlan32[3][2] = {{20, 11}, {9, 11}, {0, 9}};
  const bool wide = key_bits(key_mode) == 31;
  const int passes = wide ? 3 : 1;
  cudaError_t err = radix_init(state, k, stream);
  for (int i = 0; i < passes && err == cudaSuccess; ++i) {
    const int shift = wide ? kPlan32[i][0] : kPlan16[i][0];
    const int bits = wide ? kPlan32[i][1] : kPlan16[i][1];
    err = radix_hist(x, n, dtype, key_mode, state, shift, bits, hist, stream);
    const int64_t nf_digit = i == 0 ? int64_t(nonfinite_key(dtype, key_mode) >> shift) : -1;
    if (err == cudaSuccess) err = radix_choose(hist, shift, bits, state, i == passes - 1, nf_digit, out, stream);
  }
  return err;
}

}  // namespace dppa
