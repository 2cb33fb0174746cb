// The guarded update of one Sinkhorn potential (math: tcfa.ops.sinkhorn_dense),
// vectorised over entries. Why vectors: taken entry by entry with libm's exp,
// expm1 and log in double, the guard cost as much as a 256-wide row's terms:
// 100 over-relaxed iterations of 64 problems of 256^2 took 171 ms against 85
// plain (case C of `tcfa bench sinkhorn`), which kept omega = 1 the default.
#pragma once

#include <cmath>
#include <cstdint>

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
  // (v_T - v) / eps
  double target_move(double v, double x) const { return (tau - 1.0) * v / eps - tau * x; }
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

// v[q] = log v[q] for q < n, every v[q] finite, normal and positive.
__attribute__((always_inline)) inline void logs_in_place(double* v, int64_t n) {
  constexpr int W = lanes<double>();
  for (int64_t q0 = 0; q0 < n; q0 += W) {
    const int left = static_cast<int>(std::min<int64_t>(W, n - q0));
    const dvec l = vlog<double>(load_partial<double>(v + q0, left, 1.0));
    for (int q = 0; q < left; ++q) v[q0 + q] = l[q];
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
    dvec vv = splat<double>(0.0), xv = vv, wv = vv;
    for (int l = 0; l < left; ++l) vv[l] = v[q0 + l], xv[l] = x[q0 + l], wv[l] = wt[q0 + l];
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
    const dvec e = w ? vexp<double>(move) : move;
    for (int l = 0; l < left; ++l) {
      d[q0 + l] = move[l];
      if (w) w[q0 + l] = e[l];
    }
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
