// The fused apply pass: per element and model, factor from the plan (threshold levels with exact-k
// tie budgets, DARE hash, mask), × scale × weight, sum or TIES combine, + base, one cast. And the
// L1 sums of a plan. Works tile by tile (fp32 tile buffers in L1/L2), never on whole-tensor
// temporaries, writing straight into the output.
#include <algorithm>
#include <cmath>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"

namespace dppa {
namespace {

constexpr int64_t kTile = 1024;
constexpr int kMaxLevels = 8;
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
void tie_prefix(Model& m, const Chunks& ch, int nt) {
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

Model make_model(const PlanDesc& pd, int64_t n) {
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
    m.rank_pass = pd.needs_rank && pd.tie_mode == kExactK;
  } else {
    check(pd.kind == kDense || pd.kind == kDare || pd.kind == kMask, "known plan kind");
    check(pd.kind != kMask || pd.mask != 0, "mask plan has a mask");
  }
  return m;
}

// The tie mode of a one-level exact-k model over a whole chunk [s, e) inside one partition, when
// the chunk's tie counts decide it: every tie kept (the budget covers the chunk's last tie), or none
// (spent before the chunk). -1: decide per segment.
int chunk_mode(const Model& m, int64_t c, int64_t s, int64_t e) {
  if (m.pd->kind != kThresholds || m.K != 1) return -1;
  const int64_t p = s / m.parts.L;
  if ((e - 1) / m.parts.L != p) return -1;
  const int md = m.mode(p, 0);
  if (md != kModeRank) return md;
  const int64_t r0 = m.prefix[c], budget = m.budget[p];
  if (r0 >= budget) return kModeGt;
  return r0 + m.tail[c] <= budget ? kModeGe : -1;
}

// out[t0 .. t0 + len) = cast(base + lam · mixed).
template <int BD, int OD, bool HasBase>
void tile_store(const void* base, void* out, int64_t t0, int64_t len, const float* __restrict mixed, float lam) {
  for (int64_t i = 0; i < len; ++i) {
    float r = mixed[i] * lam;
    if constexpr (HasBase) r = load_f32<BD>(base, t0 + i) + r;
    store_from_f32<OD>(out, t0 + i, r);
  }
}

struct Ctx {
  std::vector<Model> models;
  std::vector<float> weights;
  CombineDesc comb;
  const void* base;
  int base_dtype, out_dtype;
  void* out;
};

// Σ_i w_i·v_i in model order (fp32), then the divisor.
void combine_sum(const CombineDesc& c, const float* w, int M, int64_t len, const float* __restrict vbuf,
                 float* __restrict mix) {
  for (int64_t e = 0; e < len; ++e) mix[e] = 0.f;
  for (int i = 0; i < M; ++i) {
    const float wi = w[i];
    const float* __restrict v = vbuf + i * kTile;
    for (int64_t e = 0; e < len; ++e) mix[e] = mix[e] + v[e] * wi;
  }
  if (c.normalize) {
    const float div = c.divisor == 0 ? float(c.sum_divisor) : c.divisor == 1 ? float(M) : 1.f;
    for (int64_t e = 0; e < len; ++e) mix[e] = mix[e] / div;
  }
}

// TIES: elect a sign per element (vote >= 0 is +), sum the weighted values that agree (zeros never
// agree), divide by the agreeing weights or count. Same fp32 operations as the torch backend.
void combine_ties(const CombineDesc& c, const float* w, int M, int64_t len, const float* __restrict vbuf,
                  float* __restrict vote, float* __restrict aux, float* __restrict mix) {
  const bool weighted_src = c.elect == 0 || c.elect == 1, by_sign = c.elect == 1 || c.elect == 3;
  for (int64_t e = 0; e < len; ++e) vote[e] = 0.f, mix[e] = 0.f, aux[e] = 0.f;
  for (int i = 0; i < M; ++i) {
    const float ws = weighted_src ? w[i] : 1.f;
    const float* __restrict v = vbuf + i * kTile;
    if (by_sign) {
      for (int64_t e = 0; e < len; ++e) {
        const float s = v[e] * ws;
        vote[e] = vote[e] + (s > 0.f ? 1.f : s < 0.f ? -1.f : 0.f);
      }
    } else {
      for (int64_t e = 0; e < len; ++e) vote[e] = vote[e] + v[e] * ws;
    }
  }
  const bool by_weight = c.divisor == 0;
  for (int i = 0; i < M; ++i) {
    const float wi = w[i], ws = weighted_src ? wi : 1.f;
    const float* __restrict v = vbuf + i * kTile;
    const float wa = by_weight ? wi : 1.f;  // divisor sums w·agree, or agree
    for (int64_t e = 0; e < len; ++e) {
      const float s = v[e] * ws;
      // bitwise, not branchy, so that the loop vectorises
      const float agree = float(((vote[e] >= 0.f) & (s > 0.f)) | ((vote[e] < 0.f) & (s < 0.f)));
      mix[e] = mix[e] + (v[e] * wi) * agree;
      aux[e] = aux[e] + wa * agree;
    }
  }
  if (c.normalize && c.divisor != 2) {
    if (by_weight)
      for (int64_t e = 0; e < len; ++e) mix[e] = mix[e] / (aux[e] == 0.f ? 1.f : aux[e]);
    else
      for (int64_t e = 0; e < len; ++e) mix[e] = mix[e] / std::max(aux[e], 1.f);
  }
}

// One tile: every model's values into vbuf rows, then the combine into mix, then the store.
void run_tile(const Ctx& cx, int64_t t0, int64_t len, std::vector<int64_t>& rank, const int* forced, uint32_t* key,
              float* f, float* vbuf, float* mix, float* aux) {
  const int M = int(cx.models.size());
  for (int i = 0; i < M; ++i) {
    const Model& m = cx.models[i];
    if (m.pd->kind == kThresholds && m.K == 1) {
      dispatch_d_kd(m.pd->dtype, m.pd->key_dtype, [&](auto d, auto kd) {
        thr1_values<decltype(d)::value, decltype(kd)::value>(m, t0, len, rank.data() + i * kMaxLevels, key, f,
                                                             vbuf + i * kTile, forced[i]);
      });
      continue;
    }
    if (m.pd->kind == kDense) {  // f = 1: v = (Δ·1)·scale without the factor tile
      dispatch_d(m.pd->dtype, [&](auto d) {
        constexpr int D = decltype(d)::value;
        float* __restrict v = vbuf + i * kTile;
        const float scale = m.scale;
        for (int64_t e = 0; e < len; ++e) v[e] = (load_f32<D>(m.x, t0 + e) * 1.f) * scale;
      });
      continue;
    }
    tile_factors<float>(m, t0, len, rank.data() + i * kMaxLevels, key, f);
    dispatch_d(m.pd->dtype, [&](auto d) { tile_values<decltype(d)::value>(m.x, m.scale, t0, len, f, vbuf + i * kTile); });
  }
  const CombineDesc& c = cx.comb;
  if (c.combine == 0) combine_sum(c, cx.weights.data(), M, len, vbuf, mix);
  else combine_ties(c, cx.weights.data(), M, len, vbuf, f, aux, mix);
  const float lam = float(c.lam);
  dispatch_d(cx.out_dtype, [&](auto od) {
    constexpr int OD = decltype(od)::value;
    if (!cx.base) return tile_store<kF32, OD, false>(nullptr, cx.out, t0, len, mix, lam);
    dispatch_d(cx.base_dtype, [&](auto bd) { tile_store<decltype(bd)::value, OD, true>(cx.base, cx.out, t0, len, mix, lam); });
  });
}

// The output was just allocated (torch.empty: fresh mmap'd pages for large tensors). Asking for
// transparent huge pages before the first write turns ~256 page faults per MiB into ~1/2: the faults
// and their page clearing otherwise cost as much as the whole fused pass.
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < int64_t(8 * kHuge)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);  // advisory: errors ignored
#else
  (void)p, (void)bytes;
#endif
}

}  // namespace

void apply(const std::vector<PlanDesc>& plans, uintptr_t base, int base_dtype, const CombineDesc& comb,
           uintptr_t out, int out_dtype, int64_t n, int nthreads) {
  check(!plans.empty(), "at least one model");
  if (n == 0) return;
  const int nt = resolve_threads(nthreads);
  Ctx cx{{}, {}, comb, reinterpret_cast<const void*>(base), base_dtype, out_dtype, reinterpret_cast<void*>(out)};
  const Chunks ch(n);
  advise_huge_pages(cx.out, n * (out_dtype == kF32 ? 4 : 2));
  for (const PlanDesc& pd : plans) cx.models.push_back(make_model(pd, n)), cx.weights.push_back(float(pd.weight));
  for (Model& m : cx.models)
    if (m.pd->kind == kThresholds) tie_prefix(m, ch, nt);
  const int M = int(plans.size());
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> f(kTile), vbuf(size_t(M) * kTile), mix(kTile), aux(kTile);
    std::vector<uint32_t> key(kTile);
    std::vector<int64_t> rank(size_t(M) * kMaxLevels);
    std::vector<int> forced(size_t(M), -1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < ch.count; ++c) {
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < cx.models[i].K; ++j) rank[i * kMaxLevels + j] = cx.models[i].prefix[c * cx.models[i].K + j];
      const int64_t s = c * ch.size, e = std::min(n, s + ch.size);
      for (int i = 0; i < M; ++i) forced[i] = chunk_mode(cx.models[i], c, s, e);
      for (int64_t t0 = s; t0 < e; t0 += kTile)
        run_tile(cx, t0, std::min(kTile, e - t0), rank, forced.data(), key.data(), f.data(), vbuf.data(), mix.data(),
                 aux.data());
    }
  }
}

std::vector<double> abs_sums(const PlanDesc& plan, int64_t n, int nthreads) {
  if (n == 0) return {0.0, 0.0};
  const int nt = resolve_threads(nthreads);
  const Chunks ch(n);
  Model m = make_model(plan, n);
  if (m.pd->kind == kThresholds) tie_prefix(m, ch, nt);
  std::vector<double> s_all(size_t(ch.count)), s_kept(size_t(ch.count));
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> f(kTile);
    std::vector<uint32_t> key(kTile);
    int64_t rank[kMaxLevels] = {};
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < ch.count; ++c) {
      for (int j = 0; j < m.K; ++j) rank[j] = m.prefix[c * m.K + j];
      const int64_t s = c * ch.size, e = std::min(n, s + ch.size);
      // per chunk, in a fixed order (8 interleaved partial sums, then chunk order): independent of
      // the thread count, and 8 independent add chains instead of one
      constexpr int kAcc = 8;
      double a8[kAcc] = {}, b8[kAcc] = {};
      for (int64_t t0 = s; t0 < e; t0 += kTile) {
        const int64_t len = std::min(kTile, e - t0);
        tile_factors<double>(m, t0, len, rank, key.data(), f.data());
        dispatch_d(plan.dtype, [&](auto d) {
          constexpr int D = decltype(d)::value;
          int64_t i = 0;
          for (; i + kAcc <= len; i += kAcc)
            for (int j = 0; j < kAcc; ++j) {
              const double x = load_f32<D>(m.x, t0 + i + j);
              a8[j] += std::fabs(x);
              b8[j] += std::fabs(x * f[i + j]);
            }
          for (; i < len; ++i) {
            const double x = load_f32<D>(m.x, t0 + i);
            a8[i % kAcc] += std::fabs(x);
            b8[i % kAcc] += std::fabs(x * f[i]);
          }
        });
      }
      double a = 0, b = 0;
      for (int j = 0; j < kAcc; ++j) a += a8[j], b += b8[j];
      s_all[c] = a, s_kept[c] = b;
    }
  }
  double a = 0, b = 0;
  for (int64_t c = 0; c < ch.count; ++c) a += s_all[c], b += s_kept[c];
  return {a, b};
}

}  // namespace dppa
