// A register-blocked micro-GEMM for the routed gated stitch: small products
// whose rows are given by pointer (rows of x, z or dout read in place by
// index, never gathered into a copy), with an epilogue called per computed
// vector so that bias, centring, gating and accumulation fuse into the store.
// Why not at::mm: the routed products are one small GEMM pair per condition,
// and a gather + at::mm_out + scatter per condition cost more than the
// arithmetic; MKL also takes its generic AVX2 path on AMD CPUs.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace tcfa {

// acc[i][v] = sum_k a[i][k] * B[k, v*W .. v*W + W) for M rows given by
// pointer (rows of x read in place by index: no gathered copy) and NV vectors
// of B's columns (B already offset to the column block, row stride ldb, its
// columns padded to whole vectors). M x NV accumulators stay in registers.
// Against a gather + at::mm_out + scatter per condition, this kernel made the
// routed top-2 forward of `tcfa bench stitch` ~1.3x faster.
template <typename T, int M, int NV>
inline void micro_kernel(const T* const* a, int64_t kdim, const T* B, int64_t ldb,
                         vec_t<T> (&acc)[M][NV]) {
  constexpr int W = lanes<T>();
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vec_t<T>{};
  for (int64_t k = 0; k < kdim; ++k) {
    vec_t<T> b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * W);
    for (int i = 0; i < M; ++i) {
      // vector * scalar: one broadcast; a lane-by-lane splat compiled to
      // masked per-lane inserts here.
      const T ai = a[i][k];
      for (int v = 0; v < NV; ++v) acc[i][v] += b[v] * ai;
    }
  }
}

// Loads the first `valid` (<= W) values at p, the other lanes 0.
template <typename T> inline vec_t<T> load_valid(const T* p, int64_t valid) {
  return valid == lanes<T>() ? load(p) : load_partial<T>(p, valid, T(0));
}

// Stores the first `valid` (<= W) lanes of v.
template <typename T> inline void store_valid(T* p, vec_t<T> v, int64_t valid) {
  if (valid >= lanes<T>()) return store(p, v);
  for (int64_t l = 0; l < valid; ++l) p[l] = v[l];
}

// Runs micro_kernel over n rows (tiles of M, the tail by a smaller M) and the
// `ncols` columns of B (blocks of NV vectors, the tail one vector at a time),
// calling epi(i, col, acc_vector) for every computed vector of row i. Rows of
// the row tile outermost: each row's `a` stays in L1 while B streams from L2.
template <typename T, int M, int NV, typename Epi>
void rows_times(const T* const* a, int64_t n, int64_t kdim, const T* B, int64_t ldb, int64_t ncols,
                Epi&& epi) {
  constexpr int W = lanes<T>();
  if constexpr (M > 1) {  // the row tail, one smaller tile size per instantiation
    const int64_t full = n / M * M;
    if (n - full > 0)
      rows_times<T, (M > 4 ? 4 : 1), NV>(
          a + full, n - full, kdim, B, ldb, ncols,
          [&](int64_t i, int64_t j, vec_t<T> v) { epi(full + i, j, v); });
    n = full;
  }
  for (int64_t i0 = 0; i0 < n; i0 += M) {
    int64_t j = 0;
    for (; j + NV * W <= ncols; j += NV * W) {
      vec_t<T> acc[M][NV];
      micro_kernel<T, M, NV>(a + i0, kdim, B + j, ldb, acc);
      for (int i = 0; i < M; ++i)
        for (int v = 0; v < NV; ++v) epi(i0 + i, j + v * W, acc[i][v]);
    }
    for (; j < ncols; j += W) {
      vec_t<T> acc[M][1];
      micro_kernel<T, M, 1>(a + i0, kdim, B + j, ldb, acc);
      for (int i = 0; i < M; ++i) epi(i0 + i, j, acc[i][0]);
    }
  }
}

// The same product with B's rows given by pointer (rows of dout or x read in
// place by index) and the reduction running over those rows: the parameter
// gradients dV_c = (g z)^T dout and dU_c^T = dz^T x of the routed backward,
// with `a` the transposed per-condition (r, n) blocks. Columns of B are not
// padded, so a tail vector is loaded partially. Column blocks outermost: one
// block of B (n rows x NV vectors) stays in L1 while every row tile of `a`
// sweeps it.
template <typename T, int M, int NV>
inline void micro_kernel_rows(const T* const* a, int64_t kdim, const T* const* brow, int64_t j,
                              int64_t valid, vec_t<T> (&acc)[M][NV]) {
  constexpr int W = lanes<T>();
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vec_t<T>{};
  for (int64_t k = 0; k < kdim; ++k) {
    vec_t<T> b[NV];
    for (int v = 0; v < NV; ++v)
      b[v] = valid >= W ? load(brow[k] + j + v * W) : load_partial<T>(brow[k] + j, valid, T(0));
    for (int i = 0; i < M; ++i) {
      const T ai = a[i][k];
      for (int v = 0; v < NV; ++v) acc[i][v] += b[v] * ai;
    }
  }
}

template <typename T, int M, int NV, typename Epi>
void rows_times_rows(const T* const* a, int64_t m, int64_t kdim, const T* const* brow,
                     int64_t ncols, Epi&& epi) {
  constexpr int W = lanes<T>();
  const int64_t full = m / M * M;
  int64_t j = 0;
  for (; j + NV * W <= ncols; j += NV * W) {
    for (int64_t i0 = 0; i0 < full; i0 += M) {
      vec_t<T> acc[M][NV];
      micro_kernel_rows<T, M, NV>(a + i0, kdim, brow, j, W, acc);
      for (int i = 0; i < M; ++i)
        for (int v = 0; v < NV; ++v) epi(i0 + i, j + v * W, acc[i][v]);
    }
    for (int64_t i = full; i < m; ++i) {  // the row tail one row at a time
      vec_t<T> acc[1][NV];
      micro_kernel_rows<T, 1, NV>(a + i, kdim, brow, j, W, acc);
      for (int v = 0; v < NV; ++v) epi(i, j + v * W, acc[0][v]);
    }
  }
  for (; j < ncols; j += W) {
    const int64_t valid = std::min<int64_t>(W, ncols - j);
    for (int64_t i = 0; i < m; ++i) {
      vec_t<T> acc[1][1];
      micro_kernel_rows<T, 1, 1>(a + i, kdim, brow, j, valid, acc);
      epi(i, j, acc[0][0]);
    }
  }
}

// (C, rows, cols) with the last dimension zero-padded to whole vectors, or t
// itself when it already is: the micro-kernel then never needs a masked load.
inline at::Tensor pad_cols(const at::Tensor& t, int64_t w) {
  const int64_t cols = t.size(2), padded = (cols + w - 1) / w * w;
  return padded == cols ? t : at::constant_pad_nd(t, {0, padded - cols});
}

}  // namespace tcfa
