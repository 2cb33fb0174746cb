// The guarded update of one Sinkhorn potential (math: tcfa.ops.sinkhorn_dense),
// vectorised over entries. Why vectors: taken entry by entry with libm's exp,
// expm1 and log in double, the guard cost as much as a 256-wide row's terms:
// 100 over-relaxed iterations of 64 problems of 256^2 took 171 ms against 85
// plain (case C of `tcfa bench sinkhorn`), which kept omega = 1 the default.
// Vectorised (and the exact-marginal guard reduced to a compare), they took
// 69-78 ms against 63-75 plain in one session; 4096^2: 3.9 against 3.8-4.1 ms
// per iteration.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "exp.h"
#include "vec.h"

namespace tcfa {

// The updates of one potential at one eps: the Sinkhorn target v_T = tau (v - eps x),
// x the log of the current marginal ratio (row sum s_i = e^x), tau = rho / (rho + eps).
// x_lo: guard_floor(omega), which decides the guard of an exact marginal.
struct Step {
  double eps, tau, omega;
  double r;      // rho / eps; infinity when this marginal is exact
  double x_lo;   // exact marginal: the over-relaxed move is kept iff x >= x_lo
  bool guarded;  // false: every move is omega (v_T - v) (the averaged symmetric update)
  Step(double eps_, double rho, double w, double x_lo_, bool guarded_ = true)
      : eps(eps_),
        tau(std::isinf(rho) ? 1.0 : rho / (rho + eps_)),
        omega(w),
        r(rho / eps_),
        x_lo(x_lo_),
        guarded(guarded_) {}
  bool plain_balanced() const { return omega == 1.0 && tau == 1.0; }
};

using dvec = vec_t<double>;

// For an exact marginal the guard depends on x alone: the over-relaxed move d = -omega x
// changes the objective by h(x) = e^x - e^{(1 - omega) x} - omega x (eps units). h(0) =
// h'(0) = 0 and h'' > 0 above x* = 2 log|1 - omega| / omega < 0, so h >= 0 on [x*, inf);
// below x*, h is concave: it stays >= 0 down to the one root x_lo when omega > 1 (h -> -inf)
// and everywhere when omega <= 1. Returns x_lo (-inf for omega <= 1), by bisection once per
// call: the guard then costs one compare per entry instead of two exps and an expm1.
inline double guard_floor(double omega) {
  if (omega <= 1.0) return -INFINITY;
  const auto h = [omega](double x) {
    return std::exp(x) - std::exp((1.0 - omega) * x) - omega * x;
  };
  double hi = 2.0 * std::log(omega - 1.0) / omega, lo = hi - 1.0;  // h(hi) >= 0
  while (h(lo) >= 0) lo = hi - 2.0 * (hi - lo);
  for (int it = 0; it < 200 && lo < hi; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid == lo || mid == hi) break;
    (h(mid) >= 0 ? hi : lo) = mid;
  }
  return hi;
}

// e^x - 1 without cancellation near 0: x (1 + x/2 (1 + x/3 (... (1 + x/17)))) for |x| < 1/2
// (truncation < 1e-21 relative), e^x - 1 above, where nothing cancels.
__attribute__((always_inline)) inline dvec vexpm1(dvec x) {
  struct Inv {
    double c[18] = {};
    constexpr Inv() {
      for (int n = 1; n < 18; ++n) c[n] = 1.0 / n;
    }
  };
  static constexpr Inv inv{};
  dvec p = splat<double>(1.0);
  for (int n = 17; n >= 2; --n) p = 1.0 + (x * inv.c[n]) * p;
  const dvec small = x * p;
  const dvec big = vexp<double>(x) - 1.0;
  return vmax<double>(x, -x) < 0.5 ? small : big;
}

// |v| finite lane by lane (x - x is NaN for inf and NaN)
inline auto finite_lanes(dvec x) { return (x - x) == 0.0; }

// `left` <= lanes values of p as doubles, the missing lanes `fill`. A whole vector of floats is
// one load and one convert: lane by lane, the loads and stores of the guarded update cost
// more than its arithmetic (27 cycles per column of a 256^2 problem).
template <typename T>
__attribute__((always_inline)) inline dvec load_double(const T* p, int left, double fill) {
  constexpr int W = lanes<double>();
  if (left == W) {
    if constexpr (std::is_same_v<T, double>) {
      return load<double>(p);
    } else {
      typedef T part __attribute__((vector_size(W * sizeof(T))));
      part h;
      std::memcpy(&h, p, sizeof(h));
      return __builtin_convertvector(h, dvec);
    }
  }
  dvec r = splat<double>(fill);
  for (int l = 0; l < left; ++l) r[l] = p[l];
  return r;
}

__attribute__((always_inline)) inline void store_double(double* p, dvec v, int left) {
  if (left == lanes<double>()) return store<double>(p, v);
  for (int l = 0; l < left; ++l) p[l] = v[l];
}

// x[q] = log(r[q]) - (sub ? sub[q] : 0) for q < n, every r[q] finite, normal and positive.
template <typename R, typename S>
__attribute__((always_inline)) inline void log_ratios(const R* r, const S* sub, int64_t n,
                                                      double* x) {
  constexpr int W = lanes<double>();
  for (int64_t q0 = 0; q0 < n; q0 += W) {
    const int left = static_cast<int>(std::min<int64_t>(W, n - q0));
    dvec l = vlog<double>(load_double<R>(r + q0, left, 1.0));
    if (sub) l -= load_double<S>(sub + q0, left, 0.0);
    store_double(x + q0, l, left);
  }
}

// The moves of nq rows with an exact marginal from their sums s (> 0, finite, normal), in T:
// d = -omega log s where log s >= x_lo (relaxed_moves' guard for an exact marginal), else
// -log s; w = e^d. Why a path of its own: relaxed_moves' fp64 log -> exp chain per block of
// four rows made the over-relaxed sweep of fp32 256^2 problems 1.4x a plain one; in fp32
// (as the plain update's f -= eps log s is) the chain is half as long.
template <typename T>
__attribute__((always_inline)) inline void exact_row_moves(const Step& st, const T* s, int nq, T* d,
                                                           T* w) {
  constexpr int W = lanes<T>();
  for (int q0 = 0; q0 < nq; q0 += W) {
    const int left = std::min(W, nq - q0);
    const vec_t<T> x = vlog<T>(load_partial<T>(s + q0, left, T(1)));
    const vec_t<T> plain = -x;
    const vec_t<T> move =
        x >= splat<T>(static_cast<T>(st.x_lo)) ? static_cast<T>(st.omega) * plain : plain;
    const vec_t<T> e = vexp<T>(move);
    for (int q = 0; q < left; ++q) d[q0 + q] = move[q], w[q0 + q] = e[q];
  }
}

// What the error sum of relaxed_moves measures per entry.
enum class Gap {
  kTarget,  // |exp(-(v_T - v)/eps) - 1|: the marginal violation at v (the row part)
  kMiss,    // |exp((v' - v_T)/eps) - 1|: what a relaxed move leaves (the column part)
};

// For q < n: d[q] = (v'_q - v_q) / eps, the move of potential v_q with log marginal ratio
// x[q]: omega (v_T - v) where that does not lower the dual objective (the op's guard),
// else the plain v_T - v. In eps units, moving v by d changes the objective by
// phi'-term - e^x (e^d - 1), the phi'-term being d (exact marginal) or
// r e^{-v / rho} (1 - e^{-d / r}) (KL-relaxed). w (may be null): e^{d[q]}. Returns
// sum_q wt[q] gap_q over the entries whose v and x are finite (the caller updates the others).
template <typename T>
__attribute__((always_inline)) inline double relaxed_moves(const Step& st, const T* v,
                                                           const double* x, const T* wt, int64_t n,
                                                           Gap gap, double* d, double* w) {
  constexpr int W = lanes<double>();
  const bool kl = !std::isinf(st.r);
  dvec err = splat<double>(0.0);
  for (int64_t q0 = 0; q0 < n; q0 += W) {
    const int left = static_cast<int>(std::min<int64_t>(W, n - q0));
    dvec vv = load_double<T>(v + q0, left, 0.0), xv = load_double<double>(x + q0, left, 0.0),
         wv = load_double<T>(wt + q0, left, 0.0);
    const auto ok = finite_lanes(vv) & finite_lanes(xv);
    const dvec zero = splat<double>(0.0);
    vv = ok ? vv : zero, xv = ok ? xv : zero, wv = ok ? wv : zero;
    const dvec plain = ((st.tau - 1.0) / st.eps) * vv - st.tau * xv;
    dvec move = plain;
    if (st.omega != 1.0) {
      const dvec over = st.omega * plain;
      if (!st.guarded) {
        move = over;
      } else if (kl) {
        const dvec gain =
            -st.r * vexp<double>(vv * (-1.0 / (st.r * st.eps))) * vexpm1(over * (-1.0 / st.r));
        move = gain - vexp<double>(xv) * vexpm1(over) >= zero ? over : plain;
      } else {
        move = xv >= splat<double>(st.x_lo) ? over : plain;
      }
    }
    // the gaps only measure the error: e^y - 1 is exact to 1e-16 absolute, which is enough
    const dvec g = vexp<double>(gap == Gap::kTarget ? -plain : move - plain) - 1.0;
    err += wv * vmax<double>(g, -g);
    store_double(d + q0, move, left);
    if (w) store_double(w + q0, vexp<double>(move), left);
  }
  return hsum<double>(err);
}

// One entry's move (the fallbacks of rows and columns whose sums are out of range).
inline double relaxed_move(const Step& st, double v, double x) {
  const double one = 1.0;
  double d;
  relaxed_moves<double>(st, &v, &x, &one, 1, Gap::kTarget, &d, nullptr);
  return d;
}

}  // namespace tcfa
