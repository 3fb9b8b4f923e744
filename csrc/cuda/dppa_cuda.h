// Host entry points of the CUDA kernels (defined in the .cu files, bound in dppa_cuda_api.cpp).
// Every function takes raw device pointers, sizes and the CUDA stream to launch on; none
// allocates or synchronises. They return cudaSuccess or the launch error.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../vocab.h"  // element dtype codes (Dtype), magnitude-key modes (KeyMode), kHistBins

namespace dppa {

// One radix pass over x: histogram of digit (key >> shift) & (2^bits - 1) of the keys whose
// already-decided high bits match state (prefix, mask); per-CTA shared-memory histogram (4·2^bits
// bytes), flushed with one global atomic per non-zero bin into hist (uint64, zeroed by the caller).
// bits = 15, shift = 0, state zero: the full 32768-bin histogram of a 16-bit key in one pass.
cudaError_t radix_hist(const void* x, int64_t n, int dtype, int key_mode, const int64_t* state, int shift,
                       int bits, unsigned long long* hist, cudaStream_t stream);

// Single-CTA digit choice: finds the digit of the state's k_rem-th largest key, updates state
// (prefix, mask, k_rem, above), zeroes hist for the next pass; on the final pass writes
// out = (tau, c_above, c_eq, state[4]). nf_digit >= 0: adds the keys of digits >= nf_digit to
// state[4] (the NaN/Inf count, on the first pass).
cudaError_t radix_choose(unsigned long long* hist, int shift, int bits, int64_t* state, int final_pass,
                         int64_t nf_digit, int64_t* out, cudaStream_t stream);

// state = (prefix 0, mask 0, k_rem k, above 0, NaN/Inf count 0).
cudaError_t radix_init(int64_t* state, int64_t k, cudaStream_t stream);

// Exact select for one partition (the whole tensor): 16-bit keys in one pass (32768 bins),
// 31-bit keys in three (11/11/9 bits). hist: 32768 uint64 zeroed; state: 5 int64; out: 4 int64
// (tau, c_above, c_eq, number of keys at or above nonfinite_key: NaN/Inf, counted for free).
cudaError_t select_tensor(const void* x, int64_t n, int dtype, int key_mode, int64_t k,
                          unsigned long long* hist, int64_t* state, int64_t* out, cudaStream_t stream);

// Exact select for P partitions of length L (the last may be shorter): one CTA per partition,
// 8-bit-digit radix in shared memory. k: P int64 on the device; out: 4×P int64 (tau, c_above, c_eq,
// and the partition's keys at or above nonfinite_key, counted in the first pass; for k <= 0 only
// with scan_all, else 0).
cudaError_t select_partitions(const void* x, int64_t n, int64_t part_len, int64_t n_parts, int dtype, int key_mode,
                              const int64_t* k, int scan_all, int64_t* out, cudaStream_t stream);

// Key width (15 or 31) of a key mode, for host code that does not include keys.cuh.
int key_bits_host(int key_mode);

}  // namespace dppa
