// CPU kernel of tcfa::sinkhorn_dense: whole Sinkhorn loops on stored costs, the
// eps annealing stages and over-relaxation included. The math is stated once,
// in tcfa/ops/__init__.py.
//
// Why a fused loop instead of two softmin_dense calls per iteration:
// * one exp per cost entry per iteration, not two. With the previous
//   potentials as a fixed shift, E_ij = b_j exp((f_i + g_j - C_ij)/eps) is
//   O(1) near convergence, so the row sum s_i = sum_j E_ij needs no running
//   max, and the next column sums reuse the same E:
//       f'_i = f_i - eps log s_i,
//       sum_i a_i b_j exp((f'_i + g_j - C_ij)/eps) = sum_i (a_i / s_i) E_ij =: acc_j,
//       g'_j = g_j - eps (log acc_j - log b_j).
//   So one read of the cost serves the f-update of iteration t and the
//   g-update of iteration t+1, and the L1 marginal error is sum_i a_i |s_i - 1|.
// * unbalanced OT (tau < 1, tcfa/ot_unbalanced.py) keeps the one read: f'_i =
//   tau_a (f_i - eps log s_i) changes each row's weight in the column sums to
//   a_i w_i, w_i = exp((f'_i - f_i)/eps), and g' = tau_b (g - eps (log acc - log b)).
// * over-relaxation (omega) and the annealing stages keep it too: a row's move
//   is decided from s_i alone (relaxed_move), and the g-update computed in
//   pass t runs at pass t's eps, which is why the op defines the g-update of
//   iteration t at eps_{t-1}. One call runs the whole schedule: calling
//   once per stage cost an extra column pass per stage (43 passes instead of
//   32 for the 4096^2 benchmark solve).
// * a problem whose cost fits in L2 runs all its iterations in one task, its
//   cost read from cache instead of memory.
// Rows or columns whose sums leave the range where the shifted exps are exact
// (early iterations, tiny eps) are recomputed with the one-pass online max.
#include "checks.h"
#include "dense_columns.h"
#include "exp.h"
#include "kernels.h"
#include "relaxed.h"
#include "tasks.h"
#include "vec.h"

namespace tcfa {
namespace {

// Limits of the one-exp path. Terms over/underflow to inf/0, so a finite row
// sum below row_hi proves no term overflowed. row_lo: the smallest row sum s_i trusted for f (terms
// flushed to 0 below ~1e-38 / 1e-307 then weigh < 1e-12 of it). col_row_lo: rows with s_i below it
// would scale flushed terms by 1/s_i in the column sums, so the columns take the fallback. acc_lo /
// acc_hi: the accepted column sums.
template <typename T> struct Safe;
template <> struct Safe<float> {
  static constexpr float row_hi = 1e37f, row_lo = 1e-20f, col_row_lo = 1e-4f, acc_lo = 1e-25f,
                         acc_hi = 1e30f;
};
template <> struct Safe<double> {
  static constexpr double row_hi = 1e300, row_lo = 1e-250, col_row_lo = 1e-40, acc_lo = 1e-250,
                          acc_hi = 1e280;
};

// A cost problem bigger than this runs its iterations in lock-step over row
// chunks on all threads; smaller ones (with at least one per thread) run whole
// loops in one task while their cost stays in the 1 MB L2.
constexpr int64_t kResidentBytes = 512 * 1024;

template <typename T> constexpr T kLog2e = T(1.4426950408889634);
// Stands for -inf in exponents: finite (vexp2_finite needs it), far below underflow.
template <typename T> constexpr T kNegHuge = std::numeric_limits<T>::lowest() / 4;

template <typename T> inline int64_t padded(int64_t m) {
  constexpr int W = lanes<T>();
  return (m + W - 1) / W * W;
}

// Shared, read-only views of the whole batch plus the potentials being updated.
template <typename T> struct Batch {
  const RaggedPair& rp;
  const T *cost, *log_a, *a, *log_b, *b;  // a, b: the weights exp(log_a), exp(log_b)
  T *f, *g;
  T* u;                 // log b_j + g_j / eps, refreshed before every pass (the fallback's terms)
  T* u2;                // the same in base 2 (log2 e * u), finite: the one-exp path's terms
  T* up;                // scratch for the column fallback: log a_i + f_i / eps
  double rho_a, rho_b;  // unbalanced OT's rho (infinity: that marginal is exact)
  const double* schedule;  // eps of iterations 1..n_schedule; eps after them
  int64_t n_schedule;
  double eps;
  double omega;
  double x_lo;         // guard_floor(omega)
  const uint8_t* sym;  // per problem: one potential, averaged updates at eps (f = g)

  int64_t n(int64_t k) const { return rp.xo[k + 1] - rp.xo[k]; }
  int64_t m(int64_t k) const { return rp.yo[k + 1] - rp.yo[k]; }
  const T* row(int64_t k, int64_t i) const { return cost + rp.co[k] + (i - rp.xo[k]) * m(k); }

  // eps of iteration t >= 1; pass 0 (the first g-update) runs at eps_1
  double eps_at(int64_t t) const {
    t = std::max<int64_t>(t, 1);
    return t <= n_schedule ? schedule[t - 1] : eps;
  }

  // The update of f (rows) or g (columns) in iteration t at eps e: over-relaxed (omega) from
  // the first target-eps iteration after the one that starts at the target eps, S + 2.
  Step step(int64_t t, double e, bool rows) const {
    const bool relaxed = t > n_schedule + 1;
    return Step(e, rows ? rho_a : rho_b, relaxed ? omega : 1.0, relaxed ? x_lo : -INFINITY);
  }

  bool symmetric(int64_t k) const { return sym[k] != 0; }
  // The averaged update of a symmetric problem: half the plain step, unguarded (an ascent step
  // whatever the marginal: the objective is concave in each entry with its maximum at v_T).
  Step symmetric_step() const { return Step(eps, rho_a, 0.5, -INFINITY, false); }
  // A symmetric problem's g is its f: copied before each pass and at the end.
  void tie(int64_t k) const {
    std::copy(f + rp.xo[k], f + rp.xo[k + 1], g + rp.yo[k]);
    refresh_u(k, static_cast<T>(eps));
  }

  void refresh_u(int64_t k, T eps) const {
    for (int64_t j = rp.yo[k]; j < rp.yo[k + 1]; ++j) {
      u[j] = log_b[j] + g[j] / eps;
      u2[j] = std::max(kLog2e<T> * u[j], kNegHuge<T>);  // zero weights: 2^-huge = 0
    }
  }
};

// For R consecutive rows q of one problem (cost rows c + q m):
// E_qj = 2^(u2_j - C_qj log2(e) / eps + shift2[q]) into e + q mp (padded with
// zeros), and s[q] = sum_j E_qj. Four rows at once share each u2 load and give
// the out-of-order core four independent exp chains and row-sum chains per
// column step instead of one (~1.2x faster on case C of `tcfa bench
// sinkhorn`, 64 x 256^2). The unroll pragmas keep the four row sums in
// registers: without them GCC stores the accumulator array to the stack on
// every column step. kPrefetch: the cost streams from memory, so the rows R
// ahead (the next block) are prefetched into L2 meanwhile; without it the
// hardware prefetcher stalls while the block's column sums are added, and the
// sweep reads the cost at half the speed of a plain row soft-min.
template <typename T, bool kPrefetch, int R>
inline void row_terms(const T* u2, const T* c, const T* shift2, T neg_scale, int64_t m, int64_t mp,
                      T* e, T* s) {
  constexpr int W = lanes<T>();
  const vec_t<T> ns = splat<T>(neg_scale);
  vec_t<T> sh[R], acc[R];
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q) sh[q] = splat<T>(shift2[q]), acc[q] = splat<T>(T(0));
  int64_t j = 0;
  for (; j + W <= m; j += W) {
    const vec_t<T> uj = load(u2 + j);
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) {
      if constexpr (kPrefetch) __builtin_prefetch(c + (R + q) * m + j, 0, 2);
      const vec_t<T> v = vexp2_finite<T>(uj + ns * load(c + q * m + j) + sh[q]);
      store(e + q * mp + j, v);
      acc[q] += v;
    }
  }
  if (j < m) {
    const int left = static_cast<int>(m - j);
    const vec_t<T> uj = load_partial<T>(u2 + j, left, kNegHuge<T>);
    for (int q = 0; q < R; ++q) {
      const vec_t<T> v =
          vexp2_finite<T>(uj + ns * load_partial<T>(c + q * m + j, left, T(0)) + sh[q]);
      store(e + q * mp + j, v);
      acc[q] += v;
    }
  }
  for (int q = 0; q < R; ++q) s[q] = hsum<T>(acc[q]);
}

// acc_j += sum_q coef_q e_q[j] over nq <= 4 buffered rows of padded width mp.
template <typename T>
inline void add_rows(T* acc, const T* e, const T* coef, int nq, int64_t mp) {
  constexpr int W = lanes<T>();
  if (nq == 4) {  // the common case: one load/store of acc per 4 rows
    const vec_t<T> c0 = splat<T>(coef[0]), c1 = splat<T>(coef[1]), c2 = splat<T>(coef[2]),
                   c3 = splat<T>(coef[3]);
    for (int64_t j = 0; j < mp; j += W)
      store(acc + j, load(acc + j) + (c0 * load(e + j) + c1 * load(e + mp + j)) +
                         (c2 * load(e + 2 * mp + j) + c3 * load(e + 3 * mp + j)));
    return;
  }
  for (int q = 0; q < nq; ++q) {
    const vec_t<T> cq = splat<T>(coef[q]);
    for (int64_t j = 0; j < mp; j += W) store(acc + j, load(acc + j) + cq * load(e + q * mp + j));
  }
}

struct PassResult {
  double err = 0;       // sum_i a_i |row marginal ratio - 1|, rows of this chunk
  bool cols_ok = true;  // acc holds exact column sums for this chunk
};

// One sweep over rows [r0, r1) of problem k. update_f: replace f_i by its
// soft-min update (and measure the error); accumulate: add this chunk's column
// sums with the current f into acc (padded width). ebuf holds 4 padded rows,
// sbuf r1 - r0 row sums (their logs are taken in one vector pass at the end), or
// the rows' moves when the step is not plain and balanced.
template <typename T, bool kPrefetch>
PassResult sweep(const Batch<T>& b, const Step& st, int64_t k, int64_t r0, int64_t r1,
                 bool update_f, bool accumulate, T* acc, T* ebuf, T* sbuf) {
  using S = Safe<T>;
  const int64_t m = b.m(k), mp = padded<T>(m);
  const T* u = b.u + b.rp.yo[k];
  const T* u2 = b.u2 + b.rp.yo[k];
  const T eps = static_cast<T>(st.eps), nie = T(-1) / eps;
  PassResult res;
  for (int64_t i0 = r0; i0 < r1; i0 += 4) {
    const int nq = static_cast<int>(std::min<int64_t>(4, r1 - i0));
    T coef[4], sums[4], shift2[4];
    for (int q = 0; q < nq; ++q) shift2[q] = kLog2e<T> * b.f[i0 + q] / eps;
    const T ns = kLog2e<T> * nie;
    if (nq == 4) {
      row_terms<T, kPrefetch, 4>(u2, b.row(k, i0), shift2, ns, m, mp, ebuf, sums);
    } else {
      for (int q = 0; q < nq; ++q)
        row_terms<T, kPrefetch, 1>(u2, b.row(k, i0 + q), shift2 + q, ns, m, mp, ebuf + q * mp,
                                   sums + q);
    }
    // relaxed or unbalanced: the rows' moves (f'_i - f_i)/eps, their weights e^move in the next
    // column sums and their error terms, for the nq rows at once (rows out of range weigh 0)
    T moves[4], weights[4];
    if (update_f && !st.plain_balanced()) {
      T r[4] = {1, 1, 1, 1}, wt[4] = {};
      for (int q = 0; q < nq; ++q) {
        const bool exact = sums[q] >= S::row_lo && sums[q] <= S::row_hi;
        if (exact) r[q] = sums[q], wt[q] = b.a[i0 + q];
      }
      if (st.tau == 1.0 && st.guarded) {  // over-relaxed, exact marginal: the error is plain's
        exact_row_moves<T>(st, r, nq, moves, weights);
        for (int q = 0; q < nq; ++q) res.err += static_cast<double>(wt[q]) * std::abs(r[q] - 1.0);
      } else {
        double x[4], d[4], e[4];
        log_ratios<T, T>(r, nullptr, nq, x);
        res.err += relaxed_moves<T>(st, b.f + i0, x, wt, nq, Gap::kTarget, d, e);
        for (int q = 0; q < nq; ++q)
          moves[q] = static_cast<T>(d[q]), weights[q] = static_cast<T>(e[q]);
      }
    }
    for (int q = 0; q < nq; ++q) {
      const int64_t i = i0 + q;
      T* e = ebuf + q * mp;
      const T s = sums[q];
      const bool exact = s >= S::row_lo && s <= S::row_hi;  // false for NaN too
      // the row's move and its weight in the next column sums (1/s when plain)
      T move = 0, w = T(1) / s;
      if (update_f && exact && !st.plain_balanced()) move = moves[q], w = weights[q];
      const bool col_exact =
          exact && (!update_f || (s >= S::col_row_lo && w <= T(1) / S::col_row_lo));
      coef[q] = col_exact ? (update_f ? b.a[i] * w : b.a[i]) : T(0);
      res.cols_ok = res.cols_ok && col_exact;
      if (update_f) {
        sbuf[i - r0] = st.plain_balanced() ? s : move;
        if (!exact) {  // the online max: exact whatever the range
          LseState<T> lse;
          lse.add_affine(u, b.row(k, i), nie, m);
          const double f_plain = -static_cast<double>(eps) * lse.result();
          res.err += static_cast<double>(b.a[i]) *
                     std::abs(std::expm1((b.f[i] - st.tau * f_plain) / st.eps));
          if (std::isfinite(f_plain) && std::isfinite(b.f[i]))  // x = log s_i, exactly
            b.f[i] += eps * static_cast<T>(relaxed_move(st, b.f[i], (b.f[i] - f_plain) / st.eps));
          else  // an empty sum (every column weightless): f_T = +inf, no move to relax
            b.f[i] = static_cast<T>(st.tau * f_plain);
          // plain: marks the row, which the pass below neither shifts nor counts; relaxed: moved
          // already
          sbuf[i - r0] = st.plain_balanced() ? T(-1) : T(0);
        }
      }
      if (coef[q] == T(0)) std::fill(e, e + mp, T(0));  // may hold inf: keep 0 * e finite
    }
    if (accumulate && res.cols_ok) add_rows(acc, ebuf, coef, nq, mp);
  }
  if (update_f) {
    if (st.plain_balanced()) {
      for (int64_t i = r0; i < r1; ++i) {
        const double si = sbuf[i - r0];
        if (si < 0) {  // recomputed by the online max: counted already
          sbuf[i - r0] = T(1);
          continue;
        }
        res.err += static_cast<double>(b.a[i]) * std::abs(si - 1.0);
      }
      sub_scaled_log<T>(b.f + r0, sbuf, nullptr, eps,
                        r1 - r0);  // f_i -= eps log s_i, one vector pass
    } else {
      for (int64_t i = r0; i < r1; ++i) b.f[i] += eps * sbuf[i - r0];  // the moves taken above
    }
  }
  return res;
}

// g_j's update from l_j = log(acc_j / b_j) (relaxed_move) when every column sum is
// in range, else from the online column soft-min of problem k at the current f.
// Returns the column part of the next error, sum_j b_j |exp((g'_j - g_T_j)/eps) - 1|
// (0 unless over-relaxed: g' = g_T).
template <typename T>
double finish_columns(const Batch<T>& b, const Step& st, int64_t k, const T* acc, bool ok) {
  using S = Safe<T>;
  const int64_t y0 = b.rp.yo[k], m = b.m(k);
  const T eps = static_cast<T>(st.eps);
  for (int64_t j = 0; ok && j < m; ++j) ok = acc[j] >= S::acc_lo && acc[j] <= S::acc_hi;
  T* g = b.g + y0;
  if (ok && st.plain_balanced()) {
    sub_scaled_log<T>(g, acc, b.log_b + y0, eps, m);
    return 0.0;
  }
  // per-thread scratch: two heap allocations per problem and iteration were 2 % of a relaxed
  // solve of 64 problems of 256^2
  static thread_local std::vector<double> l, d;
  l.resize(m), d.resize(m);
  if (ok) {
    log_ratios<T, T>(acc, b.log_b + y0, m, l.data());
  } else {
    const std::vector<T> g_old(g, g + m);
    for (int64_t i = b.rp.xo[k]; i < b.rp.xo[k + 1]; ++i) b.up[i] = b.log_a[i] + b.f[i] / eps;
    std::vector<uint8_t> only(b.rp.B, 0);
    only[k] = 1;
    column_softmin<T>(b.cost, b.rp, only, b.up, eps, b.g);  // g - eps l
    for (int64_t j = 0; j < m; ++j)
      l[j] = (static_cast<double>(g_old[j]) - g[j]) / eps, g[j] = g_old[j];
  }
  const double col_error =
      relaxed_moves<T>(st, g, l.data(), b.b + y0, m, Gap::kMiss, d.data(), nullptr);
  for (int64_t j = 0; j < m; ++j) {
    if (!std::isfinite(l[j]) || !std::isfinite(g[j])) {  // an empty sum (every row weightless):
      const double g_plain = g[j] - st.eps * l[j];       // g' = g_T = +inf, nothing missed
      g[j] = static_cast<T>(std::isfinite(g_plain) ? st.tau * g_plain : INFINITY);
      continue;
    }
    g[j] += eps * static_cast<T>(d[j]);
  }
  return col_error;
}

// After pass t >= 1 of problem k: records its error (row part plus the column
// part left by the g-update before it) and says whether it stops.
template <typename T>
bool record(const Batch<T>& b, int64_t k, int64_t t, int64_t max_iter, double tol, double row_err,
            double col_err, int64_t* n_iter, double* error) {
  n_iter[k] = t;
  error[k] = row_err + col_err;
  return t == max_iter || ((t > b.n_schedule || b.symmetric(k)) && error[k] < tol);
}

// Whole loop of one cache-resident problem in the calling thread.
template <typename T>
void solve_one(const Batch<T>& b, int64_t k, int64_t max_iter, double tol, int64_t* n_iter,
               double* error) {
  const int64_t mp = padded<T>(b.m(k));
  const int64_t x0 = b.rp.xo[k], x1 = b.rp.xo[k + 1];
  std::vector<T> acc(mp), ebuf(4 * mp), sbuf(x1 - x0);
  if (b.symmetric(k)) {  // one f-sweep per iteration; both marginals are violated alike
    for (int64_t t = 1; t <= max_iter; ++t) {
      b.tie(k);
      const PassResult r = sweep<T, false>(b, b.symmetric_step(), k, x0, x1, true, false,
                                           acc.data(), ebuf.data(), sbuf.data());
      if (record(b, k, t, max_iter, tol, 2 * r.err, 0.0, n_iter, error)) break;
    }
    return;
  }
  double col_err = 0;
  for (int64_t t = 0; t <= max_iter; ++t) {  // pass t: f-update of iteration t, g-update of t + 1
    const Step f_step = b.step(t, b.eps_at(t), true);
    b.refresh_u(k, static_cast<T>(f_step.eps));
    std::fill(acc.begin(), acc.end(), T(0));
    const PassResult r = sweep<T, false>(b, f_step, k, x0, x1, t > 0, t < max_iter, acc.data(),
                                         ebuf.data(), sbuf.data());
    if (t > 0 && record(b, k, t, max_iter, tol, r.err, col_err, n_iter, error)) break;
    const Step g_step = b.step(t + 1, f_step.eps, false);
    col_err = finish_columns(b, g_step, k, acc.data(), r.cols_ok);
  }
}

// Problems too big for one task: every iteration sweeps row chunks of all
// still-iterating problems on all threads, then merges their column sums.
template <typename T>
void solve_lockstep(const Batch<T>& b, std::vector<uint8_t> todo, int64_t max_iter, double tol,
                    int64_t* n_iter, double* error) {
  std::vector<double> col_err(b.rp.B, 0.0);
  for (int64_t t = 0; t <= max_iter; ++t) {
    // pass 0 is a g-update only: symmetric problems start at pass 1
    std::vector<uint8_t> now = todo;
    for (int64_t k = 0; k < b.rp.B; ++k) now[k] = todo[k] && (t > 0 || !b.symmetric(k));
    const int64_t n_todo = std::count(now.begin(), now.end(), 1);
    if (std::count(todo.begin(), todo.end(), 1) == 0) return;
    if (n_todo == 0) continue;  // pass 0 with only symmetric problems left
    // Four chunks per thread, taken dynamically: with one per thread, a core
    // slowed by another tenant held the whole iteration back; the extra
    // column-sum vectors to fold are a few KB.
    const int64_t parts = (4 * at::get_num_threads() + n_todo - 1) / n_todo;
    const auto tasks = row_chunks(b.rp.xo, now, parts, kDenseRowBlock);
    const bool update_f = t > 0, accumulate = t < max_iter;
    const Step f_step = b.step(t, b.eps_at(t), true);  // the same for every problem
    for (int64_t k = 0; k < b.rp.B; ++k) {
      if (now[k] && b.symmetric(k))
        b.tie(k);
      else if (now[k])
        b.refresh_u(k, static_cast<T>(f_step.eps));
    }
    std::vector<std::vector<T>> acc(tasks.size());
    std::vector<PassResult> res(tasks.size());
    run_tasks(tasks, [&](const Task& task, int64_t ti) {
      const int64_t mp = padded<T>(b.m(task.k));
      acc[ti].assign(mp, T(0));
      std::vector<T> ebuf(4 * mp), sbuf(task.r1 - task.r0);
      const bool sym = b.symmetric(task.k);
      res[ti] =
          sweep<T, true>(b, sym ? b.symmetric_step() : f_step, task.k, task.r0, task.r1, update_f,
                         accumulate && !sym, acc[ti].data(), ebuf.data(), sbuf.data());
    });
    // Chunks of one problem are adjacent in `tasks`: fold them into the first.
    for (size_t ti = 0; ti < tasks.size();) {
      const int64_t k = tasks[ti].k;
      size_t last = ti;
      while (last + 1 < tasks.size() && tasks[last + 1].k == k) {
        ++last;
        for (size_t j = 0; j < acc[ti].size(); ++j) acc[ti][j] += acc[last][j];
        res[ti].err += res[last].err;
        res[ti].cols_ok = res[ti].cols_ok && res[last].cols_ok;
      }
      const bool sym = b.symmetric(k);
      const double err = sym ? 2 * res[ti].err : res[ti].err + col_err[k];
      if (update_f && record(b, k, t, max_iter, tol, err, 0.0, n_iter, error)) todo[k] = 0;
      if (todo[k] && !sym) {
        const Step g_step = b.step(t + 1, f_step.eps, false);
        col_err[k] = finish_columns(b, g_step, k, acc[ti].data(), res[ti].cols_ok);
      }
      ti = last + 1;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_dense_cpu(
    const at::Tensor& cost, const at::Tensor& x_offsets, const at::Tensor& y_offsets,
    const at::Tensor& log_a, const at::Tensor& log_b, const at::Tensor& f, const at::Tensor& g,
    double eps, int64_t max_iter, double tol, double tau_a, double tau_b,
    at::ArrayRef<double> schedule, double omega, const c10::optional<at::Tensor>& symmetric) {
  check_eps(eps);
  for (const double e : schedule) check_eps(e);
  TORCH_CHECK_VALUE(tau_a > 0 && tau_a <= 1 && tau_b > 0 && tau_b <= 1,
                    "tau_a and tau_b must lie in (0, 1], got ", tau_a, " and ", tau_b);
  TORCH_CHECK_VALUE(omega > 0 && omega < 2, "omega must lie in (0, 2), got ", omega);
  TORCH_CHECK_VALUE(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK_VALUE(tol >= 0, "tol must be >= 0, got ", tol);
  const RaggedPair rp = ragged_cost(cost, x_offsets, y_offsets, log_a, log_b);
  const int64_t nx = log_a.size(0), ny = log_b.size(0);
  const std::vector<uint8_t> sym = problem_flags(symmetric, rp.B, "symmetric", false);
  check_symmetric(sym, rp, log_a, log_b, tau_a, tau_b);
  check_rows(f, nx, "f");
  check_rows(g, ny, "g");
  const auto ct = compute_dtype(cost.scalar_type());
  auto cvt = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  at::Tensor c = cvt(cost), la = cvt(log_a), lb = cvt(log_b), a = la.exp(), bw = lb.exp();
  at::Tensor f_out = f.to(ct).clone(), g_out = g.to(ct).clone();
  at::Tensor u = at::empty({ny}, c.options()), u2 = at::empty({ny}, c.options());
  at::Tensor up = at::empty({nx}, c.options());
  at::Tensor n_iter = at::zeros({rp.B}, at::kLong);
  at::Tensor error = at::zeros({rp.B}, at::kDouble);

  AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_sinkhorn_dense", [&] {
    using T = scalar_t;
    // tau = rho / (rho + eps) at the target eps gives rho, and tau at every stage
    auto rho = [&](double tau) { return tau == 1.0 ? INFINITY : eps * tau / (1.0 - tau); };
    const Batch<T> b{rp,
                     c.data_ptr<T>(),
                     la.data_ptr<T>(),
                     a.data_ptr<T>(),
                     lb.data_ptr<T>(),
                     bw.data_ptr<T>(),
                     f_out.data_ptr<T>(),
                     g_out.data_ptr<T>(),
                     u.data_ptr<T>(),
                     u2.data_ptr<T>(),
                     up.data_ptr<T>(),
                     rho(tau_a),
                     rho(tau_b),
                     schedule.data(),
                     static_cast<int64_t>(schedule.size()),
                     eps,
                     omega,
                     guard_floor(omega),
                     sym.data()};
    int64_t* it = n_iter.data_ptr<int64_t>();
    double* err = error.data_ptr<double>();
    // Empty problems have nothing to iterate (the Python API rejects them).
    std::vector<uint8_t> resident(rp.B, 0), big(rp.B, 0);
    for (int64_t k = 0; k < rp.B; ++k) {
      if (b.n(k) == 0 || b.m(k) == 0) continue;
      (b.n(k) * b.m(k) * static_cast<int64_t>(sizeof(T)) <= kResidentBytes ? resident : big)[k] = 1;
    }
    if (std::count(resident.begin(), resident.end(), 1) < at::get_num_threads())
      for (int64_t k = 0; k < rp.B; ++k) big[k] |= std::exchange(resident[k], 0);
    run_tasks(row_chunks(rp.xo, resident, 1, 1),
              [&](const Task& t, int64_t) { solve_one(b, t.k, max_iter, tol, it, err); });
    solve_lockstep(b, big, max_iter, tol, it, err);
    for (int64_t k = 0; k < rp.B; ++k)
      if (b.symmetric(k)) b.tie(k);
  });
  return {f_out.to(f.scalar_type()), g_out.to(g.scalar_type()), n_iter, error.to(f.scalar_type())};
}

}  // namespace tcfa
