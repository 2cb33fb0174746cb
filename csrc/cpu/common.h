// Shared pieces of the CPU kernels: input checks that keep memory access in
// bounds, a vectorised polynomial exp, the one-pass online log-sum-exp, and a
// dynamically scheduled task loop over the rows of ragged batches.
//
// Vectors use GCC/Clang vector extensions, one register wide: 64 bytes with
// AVX-512, 32 with AVX2, 16 with SSE2. This header is compiled once per
// instruction-set level (docs/architecture.md, "CPU dispatch"). Why not libm / torch.exp: on a 2-core AVX-512 machine the polynomial
// below ran at ~6.9 G exp/s per core in cache against 0.9 G/s for torch.exp
// and 0.3 G/s for scalar expf.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <limits>
#include <string>
#include <vector>

namespace tcfa {

// ---------------------------------------------------------------- checks
// The Python API validates everything once (tcfa/_validate.py) and names the
// argument; these checks only guarantee that a direct torch.ops call can never
// read or write out of bounds. TORCH_CHECK_VALUE surfaces as ValueError.

inline std::vector<int64_t> checked_offsets(const at::Tensor& off, int64_t n_rows,
                                            const char* name) {
  TORCH_CHECK_TYPE(off.scalar_type() == at::kLong, name, " must be int64, got ",
                   off.scalar_type());
  TORCH_CHECK_VALUE(off.dim() == 1 && off.numel() >= 2, name,
                    " must be 1-D with B+1 >= 2 entries, got shape ", off.sizes());
  auto c = off.to(at::kCPU).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + c.numel());
  TORCH_CHECK_VALUE(v.front() == 0, name, " must start at 0, got ", v.front());
  TORCH_CHECK_VALUE(v.back() == n_rows, name, " must end at the number of rows (",
                    n_rows, "), got ", v.back());
  for (size_t k = 1; k < v.size(); ++k)
    TORCH_CHECK_VALUE(v[k] >= v[k - 1], name, " must be non-decreasing, got ",
                      v[k - 1], " then ", v[k], " at position ", k);
  return v;
}

// A ragged batch of B problems: x rows [xo[k], xo[k+1]) against y rows
// [yo[k], yo[k+1]); a stored cost keeps problem k's n_k x m_k block,
// row-major, at [co[k], co[k+1]) of one flat buffer.
struct RaggedPair {
  std::vector<int64_t> xo, yo, co;
  int64_t B;
};

inline RaggedPair ragged_pair(const at::Tensor& x_offsets, int64_t nx,
                              const at::Tensor& y_offsets, int64_t ny) {
  RaggedPair r;
  r.xo = checked_offsets(x_offsets, nx, "x_offsets");
  r.yo = checked_offsets(y_offsets, ny, "y_offsets");
  TORCH_CHECK_VALUE(r.xo.size() == r.yo.size(), "x_offsets and y_offsets must describe "
                    "the same number of problems, got ", r.xo.size() - 1, " and ",
                    r.yo.size() - 1);
  r.B = static_cast<int64_t>(r.xo.size()) - 1;
  r.co.assign(r.B + 1, 0);
  for (int64_t k = 0; k < r.B; ++k)
    r.co[k + 1] = r.co[k] + (r.xo[k + 1] - r.xo[k]) * (r.yo[k + 1] - r.yo[k]);
  return r;
}

inline void check_rows(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n,
                    ",), got ", t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, name, " must have dtype ", dt, ", got ",
                   t.scalar_type());
}

// Per-problem "still iterating" flags; an undefined tensor means all active.
inline std::vector<uint8_t> active_flags(const c10::optional<at::Tensor>& active,
                                         int64_t B) {
  std::vector<uint8_t> flags(B, 1);
  if (active.has_value() && active->defined()) {
    TORCH_CHECK_TYPE(active->scalar_type() == at::kBool, "active must be bool, got ",
                     active->scalar_type());
    TORCH_CHECK_VALUE(active->dim() == 1 && active->size(0) == B,
                      "active must have shape (", B, ",), got ", active->sizes());
    auto c = active->to(at::kCPU).contiguous();
    const bool* p = c.data_ptr<bool>();
    for (int64_t k = 0; k < B; ++k) flags[k] = p[k];
  }
  return flags;
}

// Costs are affine in x.y (docs/architecture.md, "Ragged batches"): C_ij = alpha_i + beta_j - gamma x_i.y_j.
enum class Cost { SqEuclidean, Cosine };

inline Cost parse_cost(c10::string_view s) {
  if (s == "sqeuclidean") return Cost::SqEuclidean;
  if (s == "cosine") return Cost::Cosine;
  TORCH_CHECK_VALUE(false, "cost must be 'sqeuclidean' or 'cosine', got '",
                    std::string(s), "'");
  return Cost::SqEuclidean;
}

// Rows prepared for the affine form: cosine rows are normalised (so alpha =
// beta = 1, gamma = 1); sqeuclidean keeps rows and uses squared norms, gamma = 2.
struct AffineRows {
  at::Tensor rows;  // (N, d), contiguous, compute dtype
  at::Tensor norm;  // (N,), the alpha (or beta) term
};

inline at::Tensor row_sq_norms(const at::Tensor& rows);  // below, with the vectors

inline AffineRows affine_rows(const at::Tensor& x, Cost cost) {
  if (cost == Cost::Cosine) {
    auto n = x.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-30);
    auto rows = (x / n).contiguous();
    // 1 - x.y = 1/2 + 1/2 - x.y: alpha = beta = 1/2, gamma = 1
    return {rows, at::full({x.size(0)}, 0.5, x.options())};
  }
  auto rows = x.contiguous();
  return {rows, row_sq_norms(rows)};
}

inline double cost_gamma(Cost cost) { return cost == Cost::Cosine ? 1.0 : 2.0; }

// fp16/bf16 inputs are computed in fp32 (the dtype rule of tcfa/ops.py).
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// ---------------------------------------------------------------- vectors
// One vector is one register of the level being compiled. Why not 64 bytes
// everywhere: GCC lowers a vector wider than the target's registers piecewise
// and passes it through memory between calls, so the AVX2 build of the 64-byte
// code ran the routed stitch of `tcfa bench levels` 22x slower than AVX-512
// and the 4096^2 dense Sinkhorn 8.7x slower.
#if defined(__AVX512F__)
#define TCFA_VEC_BYTES 64
#elif defined(__AVX__)
#define TCFA_VEC_BYTES 32
#else
#define TCFA_VEC_BYTES 16
#endif
template <typename T> struct VecOf;
template <> struct VecOf<float> {
  typedef float V __attribute__((vector_size(TCFA_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(TCFA_VEC_BYTES)));
};
template <> struct VecOf<double> {
  typedef double V __attribute__((vector_size(TCFA_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(TCFA_VEC_BYTES)));
};

template <typename T> using vec_t = typename VecOf<T>::V;
template <typename T> constexpr int lanes() { return TCFA_VEC_BYTES / sizeof(T); }

// Scalar minus vector broadcasts the scalar (one vbroadcastss), and v - 0 is
// v exactly, -0 and NaN included. The lane loop this replaces was built on
// the stack (four 16-byte stores, then a 64-byte reload inside hot loops:
// seen in perf annotate of the fused Sinkhorn's column sums).
template <typename T> inline vec_t<T> splat(T v) { return v - vec_t<T>{}; }
template <typename T> inline vec_t<T> load(const T* p) {
  vec_t<T> r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
// Loads n < lanes values and fills the rest with `fill`.
template <typename T> inline vec_t<T> load_partial(const T* p, int n, T fill) {
  vec_t<T> r = splat<T>(fill);
  for (int l = 0; l < n; ++l) r[l] = p[l];
  return r;
}
template <typename T> inline void store(T* p, vec_t<T> v) { std::memcpy(p, &v, sizeof(v)); }
// Written so the compiler emits one vmaxps/vminps (NaN semantics match).
template <typename T> inline vec_t<T> vmax(vec_t<T> a, vec_t<T> b) { return a > b ? a : b; }
template <typename T> inline vec_t<T> vmin(vec_t<T> a, vec_t<T> b) { return a < b ? a : b; }
// Horizontal reductions as a tree of half-width vectors: log2(lanes) steps
// instead of a chain of lanes-1 dependent scalar ops (it matters for short rows,
// where a row's reductions cost as much as its terms). Shuffles, not memcpy of
// halves: taking the vector's address made GCC keep loop accumulators that
// are reduced afterwards on the stack (a store-reload chain per iteration).
template <typename Vec, typename Op> inline auto reduce_tree(Vec v, Op op) {
  constexpr size_t N = sizeof(Vec) / sizeof(v[0]);
  if constexpr (N == 1) {
    return v[0];
  } else {
    const auto half = [&]<size_t... I>(std::index_sequence<I...>) {
      return op(__builtin_shufflevector(v, v, I...), __builtin_shufflevector(v, v, (I + N / 2)...));
    }(std::make_index_sequence<N / 2>{});
    return reduce_tree(half, op);
  }
}
template <typename T> inline T hmax(vec_t<T> v) {
  return reduce_tree(v, [](auto a, auto b) { return a > b ? a : b; });
}
template <typename T> inline T hsum(vec_t<T> v) {
  return reduce_tree(v, [](auto a, auto b) { return a + b; });
}

// sum_j a[j] b[j] accumulated in T, explicitly vectorised with two
// accumulators (rows streaming from L2 keep two FMA chains busy).
template <typename T> inline T dot_row(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  constexpr int W = lanes<T>();
  vec_t<T> s0 = splat<T>(T(0)), s1 = s0;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    s0 += load(a + j) * load(b + j);
    s1 += load(a + j + W) * load(b + j + W);
  }
  if (j + W <= n) s0 += load(a + j) * load(b + j), j += W;
  T sum = hsum<T>(s0 + s1);
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// The smallest finite value: the initial running max. Using it instead of -inf
// keeps (old_max - new_max) finite when every term so far is -inf (zero weight).
template <typename T> constexpr T lowest() { return std::numeric_limits<T>::lowest(); }

// exp(x) = 2^k * p(r), k = round(x / ln 2), r = x - k ln 2 (Cody-Waite split),
// p the Taylor polynomial: degree 6 for float (|rel err| < 1.3e-7 on
// |r| <= ln2/2, about one ulp), degree 13 for double (< 2e-16).
// The rounding adds R = 1.5 * 2^mant + bias: afterwards the low bits of t hold
// k + bias, so a left shift by `mant` builds 2^k with no float->int convert.
// Inputs are clamped to [-bias ln2, hi]; at the low end k + bias = 0 gives a
// zero scale, so exp(-inf) = 0 exactly (denormal results flush to 0).
// About 13 vector instructions per call (float); the first version, with a
// divide per Horner term and a separate underflow mask, ran 2.5x slower.
template <typename T> struct ExpConst;
template <> struct ExpConst<float> {
  static constexpr float lo = -88.0296919311f, hi = 88.0f, shift = 12582912.0f + 127.0f;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
  static constexpr int degree = 6, mant = 23;
};
template <> struct ExpConst<double> {
  static constexpr double lo = -709.0895657128241, hi = 709.0,
                          shift = 6755399441055744.0 + 1023.0;
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
template <typename T, bool kNonPositive = false> inline vec_t<T> vexp(vec_t<T> x) {
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

template <typename T> inline vec_t<T> vlog(vec_t<T> x) {
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

// |x_i|^2 per row of a contiguous (N, d) tensor, without the (N, d)
// temporary of (x * x).sum(1) (that pair of passes took ~20 ms of CPU per
// 16 M entries, a tenth of a 64-problem batch solve).
inline at::Tensor row_sq_norms(const at::Tensor& rows) {
  const int64_t n = rows.size(0), d = rows.size(1);
  at::Tensor out = at::empty({n}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "tcfa_row_sq_norms", [&] {
    using T = scalar_t;
    constexpr int W = lanes<T>();
    const T* r = rows.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* row = r + i * d;
        vec_t<T> acc = splat<T>(T(0));
        int64_t j = 0;
        for (; j + W <= d; j += W) acc += load(row + j) * load(row + j);
        T tail = 0;
        for (; j < d; ++j) tail += row[j] * row[j];
        o[i] = hsum<T>(acc) + tail;
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- online LSE
// Lane-wise running state of a one-pass log-sum-exp: value = log sum_l s[l] e^{m[l]}.
template <typename T> struct LseState {
  vec_t<T> m = splat<T>(lowest<T>());
  vec_t<T> s = splat<T>(T(0));

  // Folds four vectors of terms into (mm, ss) with one shared rescale: 1.25
  // exp per term instead of 2 (a two-pass max-then-sum reads the data twice
  // and was slower).
  static inline void fold4(vec_t<T>& mm, vec_t<T>& ss, vec_t<T> v0, vec_t<T> v1,
                           vec_t<T> v2, vec_t<T> v3) {
    const vec_t<T> nm = vmax<T>(vmax<T>(mm, vmax<T>(v0, v1)), vmax<T>(v2, v3));
    ss = ss * vexp<T, true>(mm - nm) + ((vexp<T, true>(v0 - nm) + vexp<T, true>(v1 - nm)) +
                                        (vexp<T, true>(v2 - nm) + vexp<T, true>(v3 - nm)));
    mm = nm;
  }
  static inline void fold1(vec_t<T>& mm, vec_t<T>& ss, vec_t<T> v) {
    const vec_t<T> nm = vmax<T>(mm, v);
    ss = ss * vexp<T, true>(mm - nm) + vexp<T, true>(v - nm);
    mm = nm;
  }

  // Folds in the terms u_j + scale * c_j, j < n.
  inline void add_affine(const T* u, const T* c, T scale, int64_t n) {
    constexpr int W = lanes<T>();
    const vec_t<T> sc = splat<T>(scale);
    // Locals, not the members: u and c may alias the members' floats, which
    // made the compiler store and reload the state every block.
    vec_t<T> mm = m, ss = s;
    int64_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W)
      fold4(mm, ss, load(u + j) + sc * load(c + j), load(u + j + W) + sc * load(c + j + W),
            load(u + j + 2 * W) + sc * load(c + j + 2 * W),
            load(u + j + 3 * W) + sc * load(c + j + 3 * W));
    for (; j < n; j += W) {
      const int left = static_cast<int>(std::min<int64_t>(W, n - j));
      // padded lanes get u = -inf, c = 0, so they add exp(-inf) = 0
      vec_t<T> uu = left == W ? load(u + j) : load_partial<T>(u + j, left, -INFINITY);
      vec_t<T> cc = left == W ? load(c + j) : load_partial<T>(c + j, left, T(0));
      fold1(mm, ss, uu + sc * cc);
    }
    m = mm;
    s = ss;
  }

  inline T result() const {  // log sum exp; -inf when every term was -inf
    const T mx = hmax<T>(m);
    const vec_t<T> w = s * vexp<T, true>(m - splat<T>(mx));
    const T tot = hsum<T>(w);
    return tot > T(0) ? mx + std::log(tot) : -INFINITY;
  }
};

// ---------------------------------------------------------------- tasks
// A unit of work: rows [r0, r1) of problem k.
struct Task {
  int64_t k, r0, r1;
};

// Splits every (active) problem's rows into blocks of at most `block` rows.
inline std::vector<Task> row_tasks(const std::vector<int64_t>& off,
                                   const std::vector<uint8_t>& active, int64_t block) {
  std::vector<Task> tasks;
  for (size_t k = 0; k + 1 < off.size(); ++k) {
    if (!active[k]) continue;
    for (int64_t r = off[k]; r < off[k + 1]; r += block)
      tasks.push_back({static_cast<int64_t>(k), r, std::min(off[k + 1], r + block)});
  }
  return tasks;
}

// Splits every (active) problem's rows into at most `parts` contiguous chunks
// of at least `min_rows` rows each.
inline std::vector<Task> row_chunks(const std::vector<int64_t>& off,
                                    const std::vector<uint8_t>& active, int64_t parts,
                                    int64_t min_rows) {
  std::vector<Task> tasks;
  for (size_t k = 0; k + 1 < off.size(); ++k) {
    const int64_t n = off[k + 1] - off[k];
    if (!active[k] || n == 0) continue;
    const int64_t p = std::max<int64_t>(1, std::min(parts, n / std::max<int64_t>(min_rows, 1)));
    for (int64_t c = 0; c < p; ++c)
      tasks.push_back({static_cast<int64_t>(k), off[k] + n * c / p, off[k] + n * (c + 1) / p});
  }
  return tasks;
}

// Flushes denormal results and operands to zero while it lives (x86 MXCSR
// FTZ + DAZ), restoring the caller's mode after. Why: Sinkhorn terms
// exp((f + g - C)/eps) at small eps fall in the denormal band by the million,
// and each costs a microcode assist on Intel cores: the fused 4096^2 loop at
// eps = 1 ran at 44-60 ms per iteration with denormals, 6 ms without. A
// denormal term weighs < 1e-38 (float) of a sum that the kernels keep O(1),
// so flushing it changes no result beyond rounding.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#endif
};

// Runs fn(task, task_index) over all tasks with dynamic scheduling: ragged
// problems make static chunking (what at::parallel_for does) unbalanced.
// kFlush = false keeps denormals (a kernel that rescales its input first).
template <bool kFlush = true, typename Fn>
inline void run_tasks(const std::vector<Task>& tasks, Fn fn) {
  const int64_t nt = static_cast<int64_t>(tasks.size());
  if (nt == 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), nt);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    const auto loop = [&] {
      for (int64_t w = b; w < e; ++w)
        for (int64_t t = next++; t < nt; t = next++) fn(tasks[t], t);
    };
    if constexpr (kFlush) {
      const FlushDenormals ftz;
      loop();
    } else {
      loop();
    }
  });
}

}  // namespace tcfa
