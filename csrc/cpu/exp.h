// Vectorised exp, exp2 and log polynomials (vec.h vectors), and the batched
// log update built on them. Why not libm or torch.exp: in cache this exp runs
// about 7x the throughput of torch.exp per core on AVX-512, and scalar expf
// is slower still (an exp-only micro-benchmark; not part of `tcfa bench`).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vec.h"

namespace tcfa {

// exp(x) = 2^k * p(r), k = round(x / ln 2), r = x - k ln 2 (Cody-Waite split),
// p the Taylor polynomial: degree 6 for float (|rel err| < 1.3e-7 on
// |r| <= ln2/2, about one ulp), degree 13 for double (< 2e-16).
// The rounding adds R = 1.5 * 2^mant + bias: afterwards the low bits of t hold
// k + bias, so a left shift by `mant` builds 2^k with no float->int convert.
// Inputs are clamped to [-bias ln2, hi]; at the low end k + bias = 0 gives a
// zero scale, so exp(-inf) = 0 exactly (denormal results flush to 0).
// About 13 vector instructions per call (float): Horner with multiplies only
// (no divide per term), and the clamp doubles as the underflow handling (no
// separate mask).
template <typename T> struct ExpConst;
template <> struct ExpConst<float> {
  static constexpr float lo = -88.0296919311f, hi = 88.0f, shift = 12582912.0f + 127.0f;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
  static constexpr int degree = 6, mant = 23;
};
template <> struct ExpConst<double> {
  static constexpr double lo = -709.0895657128241, hi = 709.0, shift = 6755399441055744.0 + 1023.0;
  static constexpr double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  static constexpr int degree = 13, mant = 52;
};

// Taylor coefficients 1/n!, n = 0..degree, for Horner's p = p * r + c_n.
template <typename T> struct ExpPoly {
  T c[ExpConst<T>::degree + 1];
  constexpr ExpPoly() : c() {
    double f = 1.0;
    for (int n = 0; n <= ExpConst<T>::degree; ++n) {
      if (n > 0) f /= n;
      c[n] = static_cast<T>(f);
    }
  }
};

// kNonPositive: the caller guarantees x <= 0 (every log-sum-exp term after
// subtracting the running max), so the upper clamp is skipped.
template <typename T, bool kNonPositive = false>
__attribute__((always_inline)) inline vec_t<T> vexp(vec_t<T> x) {
  using K = ExpConst<T>;
  using I = typename VecOf<T>::I;
  static constexpr ExpPoly<T> P{};
  x = vmax<T>(x, splat<T>(K::lo));
  if (!kNonPositive) x = vmin<T>(x, splat<T>(K::hi));
  const vec_t<T> t = x * T(1.4426950408889634) + K::shift;
  const vec_t<T> k = t - K::shift;
  const vec_t<T> r = (x - k * K::ln2_hi) - k * K::ln2_lo;
  vec_t<T> p = splat<T>(P.c[K::degree]);
  for (int n = K::degree - 1; n >= 0; --n) p = p * r + P.c[n];
  const vec_t<T> scale = (vec_t<T>)(((I)t) << K::mant);
  return p * scale;
}

// 2^x for finite x of any size (huge |x| over/underflows to inf/0): with
// AVX-512, one vreduce gives r = x - floor(x) in [0, 1) exactly and vscalef
// multiplies p(r) by 2^floor(x) itself, so neither clamps nor a Cody-Waite
// split are needed (8 vector uops against vexp's 13; vrndscale + subtract
// for the reduction cost two uops more, 2 of them on port 0 only).
// p is the Taylor polynomial of 2^r about r = 1/2, written in powers of r:
// |r - 1/2| <= 1/2 bounds its error as vexp's on |r ln 2| <= ln2/2.
// x = -inf gives NaN: callers pass a large finite negative instead.
template <typename T> struct Exp2Poly {
  T c[ExpConst<T>::degree + 1];
  constexpr Exp2Poly() : c() {
    constexpr int D = ExpConst<T>::degree;
    double a[D + 1] = {}, d[D + 1] = {};  // a_n = ln2^n / n!: 2^(1/2 + s) = sqrt2 sum_n a_n s^n
    a[0] = 1.0;
    for (int n = 1; n <= D; ++n) a[n] = a[n - 1] * 0.6931471805599453 / n;
    // (r - 1/2)^n = sum_m C(n, m) r^m (-1/2)^(n - m)
    for (int n = 0; n <= D; ++n) {
      double binom = 1.0, half = 1.0;  // C(n, m) and (-1/2)^(n-m), m from n down to 0
      for (int m = n; m >= 0; --m) {
        d[m] += a[n] * binom * half;
        binom = binom * m / (n - m + 1);
        half *= -0.5;
      }
    }
    for (int m = 0; m <= D; ++m) c[m] = static_cast<T>(1.4142135623730951 * d[m]);
  }
};

template <typename T> inline vec_t<T> vexp2_finite(vec_t<T> x) {
#if defined(__AVX512DQ__)
  static constexpr Exp2Poly<T> P{};
  constexpr int kFloor = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  // the maskz forms with a full mask: the plain ones trip -Wmaybe-uninitialized in GCC 12's headers
  vec_t<T> r;
  if constexpr (std::is_same_v<T, float>)
    r = (vec_t<T>)_mm512_maskz_reduce_ps(0xFFFF, (__m512)x, kFloor);
  else
    r = (vec_t<T>)_mm512_maskz_reduce_pd(0xFF, (__m512d)x, kFloor);
  vec_t<T> p = splat<T>(P.c[ExpConst<T>::degree]);
  for (int n = ExpConst<T>::degree - 1; n >= 0; --n) p = p * r + P.c[n];
  if constexpr (std::is_same_v<T, float>)
    return (vec_t<T>)_mm512_maskz_scalef_ps(0xFFFF, (__m512)p, (__m512)x);
  else
    return (vec_t<T>)_mm512_maskz_scalef_pd(0xFF, (__m512d)p, (__m512d)x);
#else
  return vexp<T>(x * T(0.6931471805599453));
#endif
}

// log(x) for finite normal x > 0, about 1 ulp: x = 2^e m with m in
// [sqrt(1/2), sqrt(2)) (the bit trick of musl's logf: subtracting the bits of
// sqrt(1/2) makes the exponent field round m into that range), then
// log m = 2 atanh(s) = sum_n 2 s^(2n+1) / (2n+1), s = (m - 1) / (m + 1),
// |s| <= 0.172: terms to s^9 (float) / s^21 (double) leave < 1e-9 / 1e-17.
// Batches the logs of the Sinkhorn row and column sums: scalar logf per row
// cost as much as a 256-wide row's terms.
template <typename T> struct LogConst;
template <> struct LogConst<float> {
  static constexpr int32_t sqrt_half_bits = 0x3F3504F3;
  static constexpr int terms = 5;
};
template <> struct LogConst<double> {
  static constexpr int64_t sqrt_half_bits = 0x3FE6A09E667F3BCDLL;
  static constexpr int terms = 11;
};

template <typename T> __attribute__((always_inline)) inline vec_t<T> vlog(vec_t<T> x) {
  using I = typename VecOf<T>::I;
  using L = LogConst<T>;
  constexpr int mant = ExpConst<T>::mant;
  const I bits = (I)x;
  const I e = (bits - L::sqrt_half_bits) >> mant;  // arithmetic shift: e may be negative
  const vec_t<T> m = (vec_t<T>)(bits - (e << mant));
  const vec_t<T> s = (m - T(1)) / (m + T(1));
  const vec_t<T> s2 = s * s;
  vec_t<T> p = splat<T>(T(2) / (2 * L::terms - 1));
  for (int n = L::terms - 2; n >= 0; --n) p = p * s2 + T(2) / (2 * n + 1);
  const vec_t<T> ef = __builtin_convertvector(e, vec_t<T>);
  return ef * ExpConst<T>::ln2_hi + (s * p + ef * ExpConst<T>::ln2_lo);
}

// dst_j -= scale * (log arg_j - sub_j) for j < n (sub may be null: 0); every
// arg_j a finite normal positive number.
template <typename T>
inline void sub_scaled_log(T* dst, const T* arg, const T* sub, T scale, int64_t n) {
  constexpr int W = lanes<T>();
  const vec_t<T> sc = splat<T>(scale);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vec_t<T> l = vlog<T>(load(arg + j));
    if (sub) l -= load(sub + j);
    store(dst + j, load(dst + j) - sc * l);
  }
  for (; j < n; ++j) dst[j] -= scale * (std::log(arg[j]) - (sub ? sub[j] : T(0)));
}

}  // namespace tcfa
