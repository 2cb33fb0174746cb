// SIMD vectors of the CPU kernels: GCC/Clang vector extensions, one register
// wide (64 bytes with AVX-512, 32 with AVX2, 16 with SSE2). This header is
// compiled once per instruction-set level (docs/architecture.md, "CPU
// dispatch"), so every loop steps by lanes<T>() of the level being compiled.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace tcfa {

// One vector is one register of the level being compiled. Why not 64 bytes
// everywhere: GCC lowers a vector wider than the target's registers piecewise
// and passes it through memory between calls: the AVX2 build of 64-byte
// vectors ran the routed stitch of `tcfa bench levels` 22x slower than AVX-512.
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
// v exactly, -0 and NaN included. A lane-by-lane loop is built on the stack
// instead (narrow stores, then a full-width reload, inside hot loops).
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
template <typename T> inline T dot_row(const T* __restrict__ a, const T* __restrict__ b,
                                       int64_t n) {
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

}  // namespace tcfa
