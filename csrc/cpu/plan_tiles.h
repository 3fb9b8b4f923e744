// Per-model factors and values of the fused apply pass, tile by tile: the plan's factor for each
// element (threshold levels with exact-k tie budgets, DARE hash, mask), v = (Δ·f)·scale, the
// chunking that makes per-chunk results independent of the thread count, and the exact-k tie
// ranks at chunk starts. Shared by apply.cpp (the merge) and abs_sums.cpp (the L1 sums).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace dppa {
namespace tiles {

constexpr int64_t kTile = 1024;
enum LevelMode : int { kModeGt = 0, kModeGe = 1, kModeRank = 2 };

struct Model {
  const PlanDesc* pd = nullptr;
  const void* x = nullptr;
  float scale = 1.f, weight = 1.f;
  int K = 0;
  float facf[kMaxLevels] = {};
  double facd[kMaxLevels] = {};
  Parts parts{0, 1, 1};
  const int64_t *tau = nullptr, *budget = nullptr, *ceq = nullptr;
  bool rank_pass = false;
  std::vector<int64_t> prefix;  // [chunk][K]: ties equal to τ_j seen in the partition before the chunk
  std::vector<int64_t> tail;    // [chunk][K]: ties equal to τ_j inside the chunk (its last partition)

  // exact_k keeps all ties of a level when its budget covers them, none when it is 0; only a
  // partial budget needs the running rank of each tie.
  int mode(int64_t p, int j) const {
    if (pd->tie_mode == kGe) return kModeGe;
    if (pd->tie_mode == kGt) return kModeGt;
    const int64_t b = budget[p * K + j];
    if (b <= 0) return kModeGt;
    return b >= ceq[p * K + j] ? kModeGe : kModeRank;
  }
};

template <class FT>
inline FT fac(const Model& m, int j) {
  if constexpr (sizeof(FT) == 4) return m.facf[j];
  else return m.facd[j];
}

// Keys equal to tau in x[a, b), counted in 32-bit lanes per block (vectorises without widening).
template <int D, int KD>
int64_t count_eq(const void* x, int64_t a, int64_t b, uint32_t tau) {
  int64_t c = 0;
  for (int64_t s = a; s < b; s += int64_t(1) << 20) {
    const int64_t e = std::min(b, s + (int64_t(1) << 20));
    uint32_t c32 = 0;
    for (int64_t i = s; i < e; ++i) c32 += mag_key<D, KD>(x, i) == tau;
    c += c32;
  }
  return c;
}

// Factors of x[a, a + len), all inside partition p; rank[j] = ties of level j already seen in p.
// Hot loops use local copies and restrict pointers so that they vectorise.
template <int D, int KD, class FT>
void thr_segment(const Model& m, int64_t a, int64_t len, int64_t p, int64_t* rank, uint32_t* __restrict key,
                 FT* __restrict f) {
  const void* x = m.x;
  for (int64_t i = 0; i < len; ++i) key[i] = mag_key<D, KD>(x, a + i);
  for (int64_t i = 0; i < len; ++i) f[i] = FT(0);
  const int K = m.K;
  for (int j = K - 1; j >= 0; --j) {  // descending, so the smallest level containing e wins
    const int64_t tau = m.tau[p * K + j];
    const uint32_t t32 = uint32_t(tau);
    const FT fj = fac<FT>(m, j);
    int md = m.mode(p, j);
    if (md == kModeRank) {
      const int64_t budget = m.budget[p * K + j];
      int64_t cnt = 0;
      for (int64_t i = 0; i < len; ++i) cnt += key[i] == t32;
      const int64_t r0 = rank[j];
      rank[j] = r0 + cnt;
      if (r0 + cnt <= budget) md = kModeGe;
      else if (r0 >= budget) md = kModeGt;
      else {  // the budget runs out inside this segment: rank each tie
        int64_t r = r0;
        for (int64_t i = 0; i < len; ++i) {
          const bool eq = key[i] == t32;
          const bool in = key[i] > t32 || (eq && r < budget);
          r += eq;
          f[i] = in ? fj : f[i];
        }
        continue;
      }
    }
    // key > τ  <=>  key >= τ + 1; τ <= 2^31 so both bounds fit in uint32
    const uint32_t lo = uint32_t(md == kModeGe ? tau : tau + 1);
    for (int64_t i = 0; i < len; ++i) f[i] = key[i] >= lo ? fj : f[i];
  }
}

// Factors (without scale) of x[t0, t0 + len) for one model; rank/state carried across tiles.
template <int D, int KD, class FT>
void tile_factors_thr(const Model& m, int64_t t0, int64_t len, int64_t* rank, uint32_t* key, FT* f) {
  const int64_t L = m.parts.L;
  int64_t a = t0;
  while (a < t0 + len) {
    const int64_t p = a / L, pend = std::min(m.parts.n, (p + 1) * L);
    const int64_t b = std::min(t0 + len, pend);
    thr_segment<D, KD, FT>(m, a, b - a, p, rank, key + (a - t0), f + (a - t0));
    if (b == pend)
      for (int j = 0; j < m.K; ++j) rank[j] = 0;  // next partition starts its own tie ranks
    a = b;
  }
}

template <class FT>
void tile_factors(const Model& m, int64_t t0, int64_t len, int64_t* rank, uint32_t* key, FT* __restrict f) {
  const PlanDesc& pd = *m.pd;
  switch (pd.kind) {
    case kDense:
      for (int64_t i = 0; i < len; ++i) f[i] = FT(1);
      return;
    case kDare: {
      const uint32_t k1 = pd.k1, k2 = pd.k2;
      if (pd.thr32 > 0xFFFFFFFFull) {  // p >= 1 keeps everything
        for (int64_t i = 0; i < len; ++i) f[i] = FT(1);
      } else if (uint64_t(t0) + uint64_t(len) <= (uint64_t(1) << 32)) {  // hi32(i) = 0: 32-bit lanes
        const uint32_t thr = uint32_t(pd.thr32), base = uint32_t(t0), k2h = k2;
        for (int64_t i = 0; i < len; ++i) f[i] = fmix32(fmix32((base + uint32_t(i)) ^ k1) ^ k2h) < thr ? FT(1) : FT(0);
      } else {
        const uint64_t thr = pd.thr32;
        for (int64_t i = 0; i < len; ++i) f[i] = uint64_t(rng_bits(uint64_t(t0 + i), k1, k2)) < thr ? FT(1) : FT(0);
      }
      return;
    }
    case kMask: {
      const uint8_t* mk = reinterpret_cast<const uint8_t*>(pd.mask) + t0;
      for (int64_t i = 0; i < len; ++i) f[i] = mk[i] ? FT(1) : FT(0);
      return;
    }
    default:
      dispatch_d_kd(pd.dtype, pd.key_dtype, [&](auto d, auto kd) {
        tile_factors_thr<decltype(d)::value, decltype(kd)::value, FT>(m, t0, len, rank, key, f);
      });
  }
}

// v = Δ · f · scale in fp32, the operation order of the torch backend.
template <int D>
void tile_values(const void* x, float scale, int64_t t0, int64_t len, const float* __restrict f, float* __restrict v) {
  for (int64_t i = 0; i < len; ++i) v[i] = (load_f32<D>(x, t0 + i) * f[i]) * scale;
}

// One-level plans (magnitude, TIES, breadcrumbs' upper level aside) in one loop per segment: the
// key, the factor and the value v = (Δ·f)·scale straight from Δ, without the key and factor tile
// passes. A segment whose exact-k budget runs out inside it takes the general path.
template <int D, int KD>
void thr1_values_segment(const Model& m, int64_t a, int64_t len, int64_t p, int64_t* rank, uint32_t* key, float* f,
                         float* __restrict v, int forced) {
  const void* x = m.x;
  const int64_t tau = m.tau[p];
  const uint32_t t32 = uint32_t(tau);
  int md = forced >= 0 ? forced : m.mode(p, 0);
  if (md == kModeRank) {
    const int64_t budget = m.budget[p];
    const int64_t cnt = count_eq<D, KD>(x, a, a + len, t32);
    const int64_t r0 = rank[0];
    if (r0 + cnt <= budget) md = kModeGe;
    else if (r0 >= budget) md = kModeGt;
    if (md == kModeRank) {  // rare: the general path ranks each tie (and advances rank[0] itself)
      thr_segment<D, KD, float>(m, a, len, p, rank, key, f);
      tile_values<D>(x, m.scale, a, len, f, v);
      return;
    }
    rank[0] = r0 + cnt;
  }
  const uint32_t lo = uint32_t(md == kModeGe ? tau : tau + 1);
  const float fj = m.facf[0], scale = m.scale;
  for (int64_t i = 0; i < len; ++i) {
    const float fi = mag_key<D, KD>(x, a + i) >= lo ? fj : 0.f;
    v[i] = (load_f32<D>(x, a + i) * fi) * scale;
  }
}

// forced >= 0: the mode of the whole chunk, known from its tie counts (no per-segment counting).
template <int D, int KD>
void thr1_values(const Model& m, int64_t t0, int64_t len, int64_t* rank, uint32_t* key, float* f, float* v,
                 int forced) {
  const int64_t L = m.parts.L;
  int64_t a = t0;
  while (a < t0 + len) {
    const int64_t p = a / L, pend = std::min(m.parts.n, (p + 1) * L);
    const int64_t b = std::min(t0 + len, pend);
    thr1_values_segment<D, KD>(m, a, b - a, p, rank, key + (a - t0), f + (a - t0), v + (a - t0), forced);
    if (b == pend) rank[0] = 0;
    a = b;
  }
}

// Chunks of the flat range that threads take whole: a multiple of the tile, a function of n only
// (so per-chunk partial sums, hence abs_sums, do not depend on the thread count), ~256 per tensor.
struct Chunks {
  int64_t size, count;
  explicit Chunks(int64_t n) {
    const int64_t target = (n / 256 + kTile - 1) / kTile * kTile;
    size = std::min<int64_t>(int64_t(1) << 18, std::max<int64_t>(kTile * 16, target));
    count = (n + size - 1) / size;
  }
};

// Exact-k tie ranks at every chunk start: count the ties of each chunk's last partition inside
// the chunk (parallel), then scan the chunks in order.
inline void tie_prefix(Model& m, const Chunks& ch, int nt) {
  const int K = m.K;
  const int64_t n = m.parts.n, L = m.parts.L;
  m.prefix.assign(size_t(ch.count * K), 0);
  if (!m.rank_pass) return;
  m.tail.assign(size_t(ch.count * K), 0);
  std::vector<int64_t>& tail = m.tail;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t c = 0; c < ch.count; ++c) {
    const int64_t s = c * ch.size, e = std::min(n, s + ch.size);
    const int64_t p = (e - 1) / L, a = std::max(s, p * L);
    for (int j = 0; j < K; ++j)
      if (m.mode(p, j) == kModeRank)
        dispatch_d_kd(m.pd->dtype, m.pd->key_dtype, [&](auto d, auto kd) {
          tail[c * K + j] = count_eq<decltype(d)::value, decltype(kd)::value>(m.x, a, e, uint32_t(m.tau[p * K + j]));
        });
  }
  for (int64_t c = 1; c < ch.count; ++c) {
    const int64_t s = c * ch.size, pstart = s / L * L;
    if (s == pstart) continue;  // the chunk opens a partition
    const bool prev_inside = (c - 1) * ch.size >= pstart;
    for (int j = 0; j < K; ++j)
      m.prefix[c * K + j] = tail[(c - 1) * K + j] + (prev_inside ? m.prefix[(c - 1) * K + j] : 0);
  }
}

inline Model make_model(const PlanDesc& pd, int64_t n) {
  Model m;
  m.pd = &pd;
  m.x = reinterpret_cast<const void*>(pd.data);
  m.scale = float(pd.scale);
  m.weight = float(pd.weight);
  if (pd.kind == kThresholds) {
    check(pd.K >= 1 && pd.K <= kMaxLevels, "1 <= levels <= 8");
    check(int(pd.factors.size()) == pd.K, "one factor per level");
    check(pd.L >= 1 && pd.tau != 0, "thresholds plan has a partition length and tau");
    check(pd.tie_mode != kExactK || (pd.budget != 0 && pd.c_eq != 0), "exact_k plan has budget and c_eq");
    m.K = pd.K;
    for (int j = 0; j < pd.K; ++j) m.facf[j] = float(pd.factors[j]), m.facd[j] = pd.factors[j];
    m.parts = Parts{n, pd.L, (n + pd.L - 1) / pd.L};
    m.tau = reinterpret_cast<const int64_t*>(pd.tau);
    m.budget = reinterpret_cast<const int64_t*>(pd.budget);
    m.ceq = reinterpret_cast<const int64_t*>(pd.c_eq);
    // a tie rank pass only where some level keeps part of its ties (0 < budget < c_eq)
    if (pd.tie_mode == kExactK)
      for (int64_t i = 0; i < m.parts.P * m.K && !m.rank_pass; ++i)
        m.rank_pass = m.budget[i] > 0 && m.budget[i] < m.ceq[i];
  } else {
    check(pd.kind == kDense || pd.kind == kDare || pd.kind == kMask, "known plan kind");
    check(pd.kind != kMask || pd.mask != 0, "mask plan has a mask");
  }
  return m;
}

// The tie mode of a one-level exact-k model over a whole chunk [s, e) inside one partition, when
// the chunk's tie counts decide it: every tie kept (the budget covers the chunk's last tie), or none
// (spent before the chunk). -1: decide per segment.
inline int chunk_mode(const Model& m, int64_t c, int64_t s, int64_t e) {
  if (m.pd->kind != kThresholds || m.K != 1) return -1;
  const int64_t p = s / m.parts.L;
  if ((e - 1) / m.parts.L != p) return -1;
  const int md = m.mode(p, 0);
  if (md != kModeRank) return md;
  const int64_t r0 = m.prefix[c], budget = m.budget[p];
  if (r0 >= budget) return kModeGt;
  return r0 + m.tail[c] <= budget ? kModeGe : -1;
}

}  // namespace tiles
}  // namespace dppa
