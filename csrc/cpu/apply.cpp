// The fused apply pass: per element and model, factor from the plan (plan_tiles.h), × scale ×
// weight, sum or TIES combine, + base, one cast. Works tile by tile (fp32 tile buffers in L1/L2),
// never on whole-tensor temporaries, writing straight into the output.
//
// NaN/Inf: every step propagates a non-finite input to the fp32 result (NaN·0 and Inf·0 are NaN;
// a NaN vote agrees with no sign, and a disagreeing value still adds v·0), so the store reports
// the largest magnitude of its results: a NaN/Inf there means a non-finite input (or a value that
// overflowed fp32, which the caller tells apart). No extra read of any input.
#include <algorithm>
#include <cmath>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "plan_tiles.h"

namespace dppa {
namespace {

using namespace tiles;

// out[t0 .. t0 + len) = cast(base + lam · mixed). Check: also returns the largest magnitude bits
// of the fp32 results, so that the caller sees a NaN/Inf among them.
template <int BD, int OD, bool HasBase, bool Check>
uint32_t tile_store(const void* base, void* out, int64_t t0, int64_t len, const float* __restrict mixed, float lam) {
  uint32_t top = 0;
  for (int64_t i = 0; i < len; ++i) {
    float r = mixed[i] * lam;
    if constexpr (HasBase) r = load_f32<BD>(base, t0 + i) + r;
    if constexpr (Check) top = std::max(top, f32_to_bits(r) & 0x7FFFFFFFu);
    store_from_f32<OD>(out, t0 + i, r);
  }
  return top;
}

struct Ctx {
  std::vector<Model> models;
  std::vector<float> weights;
  CombineDesc comb;
  const void* base;
  int base_dtype, out_dtype;
  void* out;
  bool check;
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
    const float div = c.divisor == kDivWeights ? float(c.sum_divisor) : c.divisor == kDivCount ? float(M) : 1.f;
    for (int64_t e = 0; e < len; ++e) mix[e] = mix[e] / div;
  }
}

// TIES: elect a sign per element (vote >= 0 is +), sum the weighted values that agree (zeros never
// agree), divide by the agreeing weights or count. Same fp32 operations as the torch backend.
void combine_ties(const CombineDesc& c, const float* w, int M, int64_t len, const float* __restrict vbuf,
                  float* __restrict vote, float* __restrict aux, float* __restrict mix) {
  const bool weighted_src = c.elect == kElectWeightedSum || c.elect == kElectCount;
  const bool by_sign = c.elect == kElectCount || c.elect == kElectFrequency;
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
  const bool by_weight = c.divisor == kDivWeights;
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
  if (c.normalize && c.divisor != kDivNone) {
    if (by_weight)
      for (int64_t e = 0; e < len; ++e) mix[e] = mix[e] / (aux[e] == 0.f ? 1.f : aux[e]);
    else
      for (int64_t e = 0; e < len; ++e) mix[e] = mix[e] / std::max(aux[e], 1.f);
  }
}

// One tile: every model's values into vbuf rows, then the combine into mix, then the store.
// Returns the largest magnitude bits of the tile's fp32 results when cx.check, else 0.
uint32_t run_tile(const Ctx& cx, int64_t t0, int64_t len, std::vector<int64_t>& rank, const int* forced,
                  uint32_t* key, float* f, float* vbuf, float* mix, float* aux) {
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
  if (c.combine == kCombineSum) combine_sum(c, cx.weights.data(), M, len, vbuf, mix);
  else combine_ties(c, cx.weights.data(), M, len, vbuf, f, aux, mix);
  const float lam = float(c.lam);
  return dispatch_d(cx.out_dtype, [&](auto od) {
    constexpr int OD = decltype(od)::value;
    if (!cx.base)
      return cx.check ? tile_store<kF32, OD, false, true>(nullptr, cx.out, t0, len, mix, lam)
                      : tile_store<kF32, OD, false, false>(nullptr, cx.out, t0, len, mix, lam);
    return dispatch_d(cx.base_dtype, [&](auto bd) {
      constexpr int BD = decltype(bd)::value;
      return cx.check ? tile_store<BD, OD, true, true>(cx.base, cx.out, t0, len, mix, lam)
                      : tile_store<BD, OD, true, false>(cx.base, cx.out, t0, len, mix, lam);
    });
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

bool apply(const std::vector<PlanDesc>& plans, uintptr_t base, int base_dtype, const CombineDesc& comb,
           uintptr_t out, int out_dtype, int64_t n, bool check_finite, int nthreads) {
  check(!plans.empty(), "at least one model");
  if (n == 0) return false;
  const int nt = resolve_threads(nthreads, n);
  Ctx cx{{}, {}, comb, reinterpret_cast<const void*>(base), base_dtype, out_dtype, reinterpret_cast<void*>(out),
         check_finite};
  const Chunks ch(n);
  advise_huge_pages(cx.out, n * (out_dtype == kF32 ? 4 : 2));
  for (const PlanDesc& pd : plans) cx.models.push_back(make_model(pd, n)), cx.weights.push_back(float(pd.weight));
  for (Model& m : cx.models)
    if (m.pd->kind == kThresholds) tie_prefix(m, ch, nt);
  const int M = int(plans.size());
  uint32_t top = 0;
#pragma omp parallel num_threads(nt) reduction(max : top)
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
        top = std::max(top, run_tile(cx, t0, std::min(kTile, e - t0), rank, forced.data(), key.data(), f.data(),
                                     vbuf.data(), mix.data(), aux.data()));
    }
  }
  return top >= nonfinite_key<kF32>();
}

}  // namespace dppa
