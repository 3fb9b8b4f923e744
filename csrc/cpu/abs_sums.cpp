// L1 sums of one sparsified delta (sum |x| and sum |f·x|, float64), for the "l1" rescale.
#include "plan_tiles.h"

namespace dppa {

using namespace tiles;

std::vector<double> abs_sums(const PlanDesc& plan, int64_t n, int nthreads) {
  if (n == 0) return {0.0, 0.0};
  const int nt = resolve_threads(nthreads, n);
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
