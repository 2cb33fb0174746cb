// The column-wise soft-min over a stored cost, shared by tcfa::softmin_dense
// (dim=0) and by the fallback of tcfa::sinkhorn_dense: for every flagged
// problem k and column j,
//   out_j = -eps * log sum_i exp(up_i - C_ij / eps),   up_i = log w_i + h_i / eps.
#pragma once

#include "checks.h"
#include "lse.h"
#include "tasks.h"
#include "vec.h"

namespace tcfa {

constexpr int64_t kDenseRowBlock = 64;

// One term into a scalar (max, sum) pair: the column tails.
template <typename T> inline void fold_scalar(T& m, T& s, T v) {
  if (v > m) {
    s = s * std::exp(m - v) + T(1);
    m = v;
  } else {
    s += std::exp(v - m);
  }
}

// Folds rows [r0, r1) into per-column running (max, sum) arrays M, S of
// width m; row i starts at base + i * m. Sweeps whole rows of the stored cost
// (never transposes it): groups of 4 rows share one rescale. Sweeping whole
// rows reads sequentially; tasks over 256-column strips instead ran half as
// fast (the dense soft-min of `tcfa bench sinkhorn`).
template <typename T>
inline void fold_columns(const T* base, const T* up, int64_t r0, int64_t r1, int64_t m,
                         T neg_inv_eps, T* M, T* S) {
  constexpr int W = lanes<T>();
  const vec_t<T> nie = splat<T>(neg_inv_eps);
  int64_t i = r0;
  for (; i + 4 <= r1; i += 4) {  // four rows at a time, full vectors
    const T* r = base + i * m;
    const vec_t<T> w0 = splat<T>(up[i]), w1 = splat<T>(up[i + 1]), w2 = splat<T>(up[i + 2]),
                   w3 = splat<T>(up[i + 3]);
    int64_t j = 0;
    for (; j + W <= m; j += W) {
      vec_t<T> mm = load(M + j), ss = load(S + j);
      LseState<T>::fold4(mm, ss, w0 + nie * load(r + j), w1 + nie * load(r + m + j),
                         w2 + nie * load(r + 2 * m + j), w3 + nie * load(r + 3 * m + j));
      store(M + j, mm);
      store(S + j, ss);
    }
    for (int q = 0; q < 4; ++q)  // tail columns one by one
      for (int64_t jj = j; jj < m; ++jj)
        fold_scalar(M[jj], S[jj], up[i + q] + neg_inv_eps * r[q * m + jj]);
  }
  for (; i < r1; ++i) {  // tail rows
    const T* r = base + i * m;
    for (int64_t jj = 0; jj < m; ++jj) fold_scalar(M[jj], S[jj], up[i] + neg_inv_eps * r[jj]);
  }
}

// The column soft-min of every flagged problem; `up` is indexed by x row.
// With fewer problems than threads a problem's rows are split into chunks,
// merged afterwards (every split costs a merge and a second set of column
// states, so problems are split only then). Called from inside a parallel
// region it runs serially.
template <typename T>
void column_softmin(const T* cost, const RaggedPair& rp, const std::vector<uint8_t>& flags,
                    const T* up, T eps, T* out) {
  const auto &xo = rp.xo, &yo = rp.yo, &co = rp.co;
  const int64_t n_active = std::max<int64_t>(1, std::count(flags.begin(), flags.end(), 1));
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t parts = (threads + n_active - 1) / n_active;
  const auto tasks = row_chunks(xo, flags, parts, kDenseRowBlock);
  std::vector<std::vector<T>> state(tasks.size());
  run_tasks(tasks, [&](const Task& t, int64_t ti) {
    const int64_t m = yo[t.k + 1] - yo[t.k];
    std::vector<T>& buf = state[ti];
    buf.assign(2 * m, T(0));
    std::fill(buf.begin(), buf.begin() + m, lowest<T>());
    fold_columns(cost + co[t.k] - xo[t.k] * m, up, t.r0, t.r1, m, T(-1) / eps, buf.data(),
                 buf.data() + m);
  });
  // A problem without x rows has an empty sum: -eps log 0 = +inf.
  for (int64_t k = 0; k < rp.B; ++k)
    if (flags[k] && xo[k + 1] == xo[k])
      std::fill(out + yo[k], out + yo[k + 1], static_cast<T>(INFINITY));
  // Merge the chunks of every problem: max, then the rescaled sums.
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t first, int64_t end) {
    for (int64_t ti = first; ti < end; ++ti) {
      if (ti > 0 && tasks[ti - 1].k == tasks[ti].k) continue;  // first chunk merges
      const int64_t k = tasks[ti].k, m = yo[k + 1] - yo[k];
      int64_t last = ti;
      while (last + 1 < static_cast<int64_t>(tasks.size()) && tasks[last + 1].k == k) ++last;
      for (int64_t j = 0; j < m; ++j) {
        T mx = state[ti][j], sum = state[ti][m + j];
        if (last > ti) {  // several chunks: rescale to the common max (one chunk needs no exp)
          for (int64_t c = ti + 1; c <= last; ++c) mx = std::max(mx, state[c][j]);
          sum = T(0);
          for (int64_t c = ti; c <= last; ++c) sum += state[c][m + j] * std::exp(state[c][j] - mx);
        }
        out[yo[k] + j] = sum > T(0) ? -eps * (mx + std::log(sum)) : static_cast<T>(INFINITY);
      }
    }
  });
}

}  // namespace tcfa
