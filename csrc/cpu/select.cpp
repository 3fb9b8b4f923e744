// Exact k-th largest magnitude key per partition (histogram radix select), the 32768-bin key
// histogram, and the DELLA rank-dependent keep mask.
#include <algorithm>
#include <cmath>

#include <immintrin.h>

#include "common.h"

namespace dppa {

int resolve_threads(int nthreads, int64_t n) {
  if (nthreads < 0) return -nthreads;  // exactly that many, no size rule (measuring the rule itself)
  return n < kSerialBelow ? 1 : nthreads > 0 ? nthreads : omp_get_max_threads();
}

namespace {

struct Sel {
  int64_t tau, above, eq;
};

// Top-down cumulative scan: the bin holding the k-th largest key (1 <= k <= total).
template <class T>
Sel scan_top(const T* h, int64_t nbins, int64_t k) {
  int64_t cum = 0;
  for (int64_t b = nbins - 1; b >= 0; --b) {
    int64_t c = int64_t(h[b]);
    if (cum + c >= k) return {b, cum, c};
    cum += c;
  }
  check(false, "keep count exceeds the partition size");
  return {0, 0, 0};
}

// Threads to use for a streaming pass over n elements: extra threads cost a histogram each.
int threads_for(int64_t n, int nt) {
  int64_t want = std::max<int64_t>(1, n / (1 << 18));
  return int(std::min<int64_t>(nt, want));
}

// Parallel histogram of the digit (key >> shift) & (nbins - 1) over x[s, s + n). With Filter,
// only keys with (key >> fshift) == fval count (second radix pass, few hits: one sub-histogram).
// Without, every thread keeps 4 interleaved sub-histograms (bin-major, lane = i & 3) so that
// runs of equal keys do not serialise on one counter's load-increment-store chain.
template <int D, int KD, bool Filter>
void parallel_hist(const void* x, int64_t s, int64_t n, int shift, int64_t nbins, int fshift, uint32_t fval,
                   uint64_t* out, int nt) {
  nt = threads_for(n, nt);
  const int lanes = Filter ? 1 : 4;
  std::vector<uint32_t*> bufs(nt, nullptr);
  const uint32_t mask = uint32_t(nbins - 1);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    std::vector<uint32_t> mine(size_t(nbins) * lanes, 0u);
    bufs[t] = mine.data();
    uint32_t* h = mine.data();
    // dynamic chunks, about 8 per thread (64 Ki..1 Mi elements): a thread that loses its core to
    // another process does not hold up the rest, and a 1 Mi-element tensor still splits
    const int64_t kChunk = std::min<int64_t>(int64_t(1) << 20,
                                             std::max<int64_t>(int64_t(1) << 16, (n / (8 * int64_t(T)) + 63) & ~int64_t(63)));
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
      const int64_t lo = s + c * kChunk, hi = std::min(s + n, lo + kChunk);
      if constexpr (Filter) {
        for (int64_t i = lo; i < hi; ++i) {
          uint32_t key = mag_key<D, KD>(x, i);
          if ((key >> fshift) == fval) ++h[(key >> shift) & mask];
        }
      } else {
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) {
          ++h[(((mag_key<D, KD>(x, i) >> shift) & mask) << 2) | 0];
          ++h[(((mag_key<D, KD>(x, i + 1) >> shift) & mask) << 2) | 1];
          ++h[(((mag_key<D, KD>(x, i + 2) >> shift) & mask) << 2) | 2];
          ++h[(((mag_key<D, KD>(x, i + 3) >> shift) & mask) << 2) | 3];
        }
        for (; i < hi; ++i) ++h[((mag_key<D, KD>(x, i) >> shift) & mask) << 2];
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nbins; ++b) {
      uint64_t c = 0;
      for (int u = 0; u < T; ++u)
        for (int l = 0; l < lanes; ++l) c += bufs[u][b * lanes + l];
      out[b] = c;
    }
  }  // implicit barrier: no buffer is freed before the reduction is done
}

// Whether a histogram of key >> shift counts a non-finite key (Inf's key has zero low bits).
template <int KD>
bool counts_nonfinite(const uint64_t* h, int shift) {
  for (uint32_t b = nonfinite_key<KD>() >> shift; b < 32768u; ++b)
    if (h[b]) return true;
  return false;
}

// k-th largest key of one large partition, every thread working on it; nf |= a non-finite key seen.
template <int D, int KD>
Sel select_parallel(const void* x, int64_t s, int64_t n, int64_t k, int nt, bool& nf) {
  if constexpr (KD != kF32) {
    std::vector<uint64_t> h(32768);
    parallel_hist<D, KD, false>(x, s, n, 0, 32768, 0, 0, h.data(), nt);
    nf = nf || counts_nonfinite<KD>(h.data(), 0);
    return scan_top(h.data(), 32768, k);
  } else {  // 31-bit keys: the high 15 bits, then the low 16 bits inside the chosen bucket
    std::vector<uint64_t> h(65536);
    parallel_hist<D, KD, false>(x, s, n, 16, 32768, 0, 0, h.data(), nt);
    nf = nf || counts_nonfinite<KD>(h.data(), 16);
    Sel hi = scan_top(h.data(), 32768, k);
    parallel_hist<D, KD, true>(x, s, n, 0, 65536, 16, uint32_t(hi.tau), h.data(), nt);
    Sel lo = scan_top(h.data(), 65536, k - hi.above);
    return {(hi.tau << 16) | lo.tau, hi.above + lo.above, lo.eq};
  }
}

// Histogram of (key >> low) - lo over nb bins with 4 interleaved lanes (an exponent-dominated key
// has few, hot bins: the lanes break the load-increment-store chain), reduced into h[0, nb).
inline void lane_hist(const uint32_t* key, int64_t n, int low, uint32_t lo, int64_t nb, uint32_t* h) {
  std::fill(h, h + nb * 4, 0u);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++h[(((key[i] >> low) - lo) << 2) | 0];
    ++h[(((key[i + 1] >> low) - lo) << 2) | 1];
    ++h[(((key[i + 2] >> low) - lo) << 2) | 2];
    ++h[(((key[i + 3] >> low) - lo) << 2) | 3];
  }
  for (; i < n; ++i) ++h[((key[i] >> low) - lo) << 2];
  for (int64_t b = 0; b < nb; ++b) h[b] = h[4 * b] + h[4 * b + 1] + h[4 * b + 2] + h[4 * b + 3];
}

// Keep, in order and in place, the keys with (key >> low) == want; returns how many.
inline int64_t compact(uint32_t* key, int64_t n, int low, uint32_t want) {
  int64_t c = 0, j = 0;
#if defined(__AVX512F__)
  // compress in registers (a compressing store to memory is slow on some cores); writing 16 lanes
  // at key + c <= key + j never clobbers keys not yet loaded
  // (v >> low) == want  <=>  v - (want << low) < 2^low (unsigned)
  const __m512i base = _mm512_set1_epi32(int(want << low)), width = _mm512_set1_epi32(int(1u << low));
  for (; j + 16 <= n; j += 16) {
    const __m512i v = _mm512_loadu_si512(key + j);
    const __mmask16 m = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(v, base), width);
    _mm512_storeu_si512(key + c, _mm512_mask_compress_epi32(v, m, v));
    c += __builtin_popcount(unsigned(m));
  }
#endif
  for (; j < n; ++j) {
    const uint32_t v = key[j];
    key[c] = v;
    c += (v >> low) == want;
  }
  return c;
}

// k-th largest key of one partition on the calling thread (row and block partitions: the data
// stays in L1/L2). Keys are copied to scratch once. If their range [min, max] is small next to n,
// one exact histogram over key - min finishes; else histogram the top 11 differing bits, compact
// the chosen bucket's keys in place and repeat. Short lists finish with nth_element.
template <int D, int KD>
Sel select_serial(const void* x, int64_t s, int64_t n, int64_t k, std::vector<uint32_t>& scratch,
                  std::vector<uint32_t>& hbuf, bool& nf) {
  scratch.resize(size_t(n));
  uint32_t* key = scratch.data();
  uint32_t kmin = UINT32_MAX, kmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = mag_key<D, KD>(x, s + i);
    key[i] = v;
    kmin = std::min(kmin, v);
    kmax = std::max(kmax, v);
  }
  nf = nf || kmax >= nonfinite_key<KD>();
  int64_t above = 0;
  while (n > 64 && kmin != kmax) {
    const int64_t range = int64_t(kmax) - kmin + 1;
    if (range <= std::max<int64_t>(2048, n / 2)) {  // clearing and scanning range bins is cheap
      hbuf.resize(size_t(range) * 4);
      lane_hist(key, n, 0, kmin, range, hbuf.data());
      const Sel b = scan_top(hbuf.data(), range, k);
      return {int64_t(kmin) + b.tau, above + b.above, b.eq};
    }
    const int low = std::max(0, 32 - __builtin_clz(kmin ^ kmax) - 11);  // top 11 differing bits
    const uint32_t lo = kmin >> low;
    const int64_t nb = int64_t((kmax >> low) - lo) + 1;  // <= 2048
    hbuf.resize(size_t(nb) * 4);
    lane_hist(key, n, low, lo, nb, hbuf.data());
    const Sel b = scan_top(hbuf.data(), nb, k);
    above += b.above;
    k -= b.above;
    const uint32_t want = lo + uint32_t(b.tau);
    if (low == 0) return {int64_t(want), above, b.eq};
    n = compact(key, n, low, want);
    kmin = UINT32_MAX, kmax = 0;
    for (int64_t i = 0; i < n; ++i) kmin = std::min(kmin, key[i]), kmax = std::max(kmax, key[i]);
  }
  if (kmin == kmax) return {int64_t(kmin), above, n};  // every candidate is the k-th key
  std::nth_element(key, key + (k - 1), key + n, std::greater<uint32_t>());
  const uint32_t tau = key[k - 1];
  int64_t eq = 0;
  for (int64_t i = 0; i < n; ++i) {
    above += key[i] > tau;
    eq += key[i] == tau;
  }
  return {int64_t(tau), above, eq};
}

// Whether a key of x[s, s + n) is non-finite: the scan for partitions that need no select (k = 0).
template <int D, int KD>
bool scan_nonfinite(const void* x, int64_t s, int64_t n, int nt) {
  uint32_t m = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : m)
  for (int64_t i = s; i < s + n; ++i) m = std::max(m, mag_key<D, KD>(x, i));
  return m >= nonfinite_key<KD>();
}

template <int D, int KD>
bool select_impl(const void* x, int64_t n, int64_t L, const int64_t* k, int64_t* tau, int64_t* above,
                 int64_t* eq, bool scan_all, int nt) {
  const Parts parts{n, L, (n + L - 1) / L};
  const int64_t none = int64_t(1) << key_bits(KD);
  auto put = [&](int64_t p, Sel r) { tau[p] = r.tau, above[p] = r.above, eq[p] = r.eq; };
  for (int64_t p = 0; p < parts.P; ++p) check(k[p] >= 0 && k[p] <= parts.len(p), "0 <= k <= partition size");
  bool nf = false;
  // Few long partitions: parallelise inside each; many: one partition per thread at a time.
  if (L >= (int64_t(1) << 20) || (parts.P < 2 * nt && L >= (int64_t(1) << 16))) {
    for (int64_t p = 0; p < parts.P; ++p) {
      if (k[p] > 0) {
        put(p, select_parallel<D, KD>(x, parts.start(p), parts.len(p), k[p], nt, nf));
      } else {
        put(p, Sel{none, 0, 0});
        if (scan_all && !nf) nf = scan_nonfinite<D, KD>(x, parts.start(p), parts.len(p), nt);
      }
    }
    return nf;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / L);
#pragma omp parallel num_threads(nt) reduction(|| : nf)
  {
    std::vector<uint32_t> scratch, hbuf;
#pragma omp for schedule(dynamic, grain)
    for (int64_t p = 0; p < parts.P; ++p) {
      if (k[p] > 0) {
        put(p, select_serial<D, KD>(x, parts.start(p), parts.len(p), k[p], scratch, hbuf, nf));
      } else {
        put(p, Sel{none, 0, 0});
        if (scan_all && !nf) nf = scan_nonfinite<D, KD>(x, parts.start(p), parts.len(p), 1);
      }
    }
  }
  return nf;
}

// Stable LSD radix sort of (key, index) by key: afterwards idx[r] is the element of ascending rank
// r with ties by index, as a stable sort of the keys gives (DELLA's ranking).
void rank_sort(std::vector<uint32_t>& key, std::vector<uint32_t>& idx, std::vector<uint32_t>& k2,
               std::vector<uint32_t>& i2, int bits) {
  const size_t n = key.size();
  k2.resize(n);
  i2.resize(n);
  uint32_t cnt[2048];
  // digits of <= 11 bits, as few passes as that allows, split evenly (15-bit keys: 8 + 7, so a
  // 1024-element row does not pay a 2048-bucket scan per pass)
  const int width = 11;
  for (int sh = 0; sh < bits; sh += width) {
    const int nb = 1 << std::min(width, bits - sh);
    std::fill(cnt, cnt + nb, 0u);
    for (size_t i = 0; i < n; ++i) ++cnt[(key[i] >> sh) & uint32_t(nb - 1)];
    if (cnt[key[0] >> sh & uint32_t(nb - 1)] == n) continue;  // one digit value: pass is a no-op
    uint32_t run = 0;
    for (int b = 0; b < nb; ++b) std::swap(cnt[b], run), run += cnt[b];
    for (size_t i = 0; i < n; ++i) {
      uint32_t pos = cnt[(key[i] >> sh) & uint32_t(nb - 1)]++;
      k2[pos] = key[i];
      i2[pos] = idx[i];
    }
    key.swap(k2);
    idx.swap(i2);
  }
}

template <int D>
void della_impl(const void* x, int64_t n, int64_t cols, double density, double epsilon, uint32_t k1,
                uint32_t k2, uint8_t* out, int nt) {
  const int64_t rows = n / cols;
  const double lo = density - epsilon, span = 2.0 * epsilon;  // p = lo + rn * span (reference order)
  const double denom = double(cols - 1);
  // The 32-bit keep threshold of each rank is the same in every row: computed once.
  std::vector<uint64_t> keep_thr(static_cast<size_t>(cols));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t rank = 0; rank < cols; ++rank) {
    const double rn = cols > 1 ? double(rank) / denom : 0.5;
    const double t = std::floor((lo + rn * span) * 4294967296.0);
    keep_thr[rank] = !(t > 0.0) ? 0 : t >= 4294967296.0 ? (uint64_t(1) << 32) : uint64_t(t);
  }
#pragma omp parallel num_threads(nt)
  {
    std::vector<uint32_t> key, idx, k2b, i2b, bits(static_cast<size_t>(cols)), start;
#pragma omp for schedule(dynamic, std::max<int64_t>(1, 16384 / cols))
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t s = r * cols;
      key.resize(size_t(cols));
      // the row's random bits in index order (vectorised: 32-bit lanes while hi32(index) is 0)
      uint32_t* __restrict bt = bits.data();
      if (uint64_t(s) + uint64_t(cols) <= (uint64_t(1) << 32)) {
        const uint32_t base = uint32_t(s);
        for (int64_t i = 0; i < cols; ++i) bt[i] = fmix32(fmix32((base + uint32_t(i)) ^ k1) ^ k2);
      } else {
        for (int64_t i = 0; i < cols; ++i) bt[i] = rng_bits(uint64_t(s + i), k1, k2);
      }
      uint32_t kmin = UINT32_MAX, kmax = 0, zeros = 0;
      for (int64_t i = 0; i < cols; ++i) {
        const uint32_t k = mag_key<D, D>(x, s + i);
        key[i] = k;
        zeros += k == 0;
        kmin = std::min(kmin, k == 0 ? UINT32_MAX : k);  // over the non-zero keys
        kmax = std::max(kmax, k);
      }
      // Few distinct non-zero magnitudes (deltas span ~15 binades: <= ~2000 bf16/fp16 keys): a
      // counting sort, ranking in one pass (zeros first, then each key in index order: the stable
      // sort's ranks). Otherwise the LSD radix sort.
      const int64_t range = zeros == uint32_t(cols) ? 0 : int64_t(kmax) - int64_t(kmin) + 1;
      if (range <= std::max<int64_t>(4096, 4 * cols)) {
        start.assign(size_t(range), 0u);
        for (int64_t i = 0; i < cols; ++i)
          if (key[i] != 0) ++start[key[i] - kmin];
        uint32_t run = zeros;
        for (int64_t b = 0; b < range; ++b) std::swap(start[b], run), run += start[b];
        uint32_t zpos = 0;
        for (int64_t i = 0; i < cols; ++i) {
          const uint32_t k = key[i];
          const uint32_t rank = k == 0 ? zpos++ : start[k - kmin]++;
          out[s + i] = uint64_t(bt[i]) < keep_thr[rank];
        }
        continue;
      }
      idx.resize(size_t(cols));
      for (int64_t i = 0; i < cols; ++i) idx[i] = uint32_t(i);
      rank_sort(key, idx, k2b, i2b, key_bits(D));
      for (int64_t rank = 0; rank < cols; ++rank) {
        const uint32_t e = idx[rank];
        out[s + e] = uint64_t(bt[e]) < keep_thr[rank];
      }
    }
  }
}

}  // namespace

bool select(uintptr_t x, int dtype, int64_t n, int64_t L, int key_dtype, uintptr_t k, uintptr_t tau,
            uintptr_t c_above, uintptr_t c_eq, bool scan_all, int nthreads) {
  check(n > 0 && L > 0, "select on a non-empty tensor with a positive partition length");
  const int nt = resolve_threads(nthreads, n);
  return dispatch_d_kd(dtype, key_dtype, [&](auto d, auto kd) {
    return select_impl<decltype(d)::value, decltype(kd)::value>(
        reinterpret_cast<const void*>(x), n, L, reinterpret_cast<const int64_t*>(k),
        reinterpret_cast<int64_t*>(tau), reinterpret_cast<int64_t*>(c_above), reinterpret_cast<int64_t*>(c_eq),
        scan_all, nt);
  });
}

void histogram(uintptr_t x, int dtype, int64_t n, int key_dtype, uintptr_t out, int nthreads) {
  check(key_dtype != kF32, "histogram keys are 15-bit (bf16 or fp16)");
  const int nt = resolve_threads(nthreads, n);
  std::vector<uint64_t> h(32768, 0);
  if (n > 0)
    dispatch_d_kd(dtype, key_dtype, [&](auto d, auto kd) {
      if constexpr (decltype(kd)::value != kF32)
        parallel_hist<decltype(d)::value, decltype(kd)::value, false>(reinterpret_cast<const void*>(x), 0, n, 0,
                                                                        32768, 0, 0, h.data(), nt);
    });
  int64_t* o = reinterpret_cast<int64_t*>(out);
  for (int b = 0; b < 32768; ++b) o[b] = int64_t(h[b]);
}

void della_mask(uintptr_t x, int dtype, int64_t n, int64_t cols, double density, double epsilon, uint32_t k1,
                uint32_t k2, uintptr_t out, int nthreads) {
  check(n > 0 && cols > 0 && n % cols == 0, "della_mask on whole rows");
  check(cols <= int64_t(UINT32_MAX), "della_mask rows shorter than 2^32");
  const int nt = resolve_threads(nthreads, n);
  dispatch_d(dtype, [&](auto d) {
    della_impl<decltype(d)::value>(reinterpret_cast<const void*>(x), n, cols, density, epsilon, k1, k2,
                                   reinterpret_cast<uint8_t*>(out), nt);
  });
}

}  // namespace dppa
