// CPU kernel of tcfa::gram_triu. The math is stated once, in
// tcfa/ops/__init__.py (gram_triu).
//
// Why a kernel of its own: the HSIC of every layer pair needs each layer's
// n x n Gram, and a Gram is symmetric, so only its upper triangle is worth
// computing. MKL has no symmetric product behind torch (no syrk), and cutting
// the triangle into panels of at::mm calls left MKL's small-product speed
// behind (n 256: 64-row panels did 62 % of the flops in 95 % of the time of
// the full product). This register-tiled loop computes the triangle only:
// 128 Grams of 256 x 256 x 512 took 21 ms against 44 ms for x @ x.T (AMD
// EPYC, 2 threads), and the rows are centred on the way in.
//
// Per layer, X (n, d) is first copied transposed and centred into xt (d, ld),
// its columns zero-padded to ld: then the tile loop reads both operands of
// step k from one contiguous row of xt (the M row values and the NV column
// vectors of the tile), and needs no masked loads.
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "large_buffer.h"
#include "tasks.h"
#include "vec.h"

namespace tcfa {
namespace {

// The register tile: kRows rows x kVecs vectors of columns. 8 x 2 keeps 16
// accumulators in AVX-512's 32 registers; the 16-register levels take 4 x 2.
#if TCFA_VEC_BYTES == 64
constexpr int kRows = 8;
#else
constexpr int kRows = 4;
#endif
constexpr int kVecs = 2;
// Rows of the triangle per task: a band is one layer's rows [r0, r1), so a
// task is large enough that the shared counter is not contended.
constexpr int64_t kBandRows = 32;

// acc[i][v] = sum_k xt[k][i0 + i] * xt[k][j + v W .. j + v W + W)
template <typename T>
inline void gram_tile(const T* xt, int64_t ld, int64_t d, int64_t i0, int64_t j,
                      vec_t<T> (&acc)[kRows][kVecs]) {
  constexpr int W = lanes<T>();
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) acc[i][v] = vec_t<T>{};
  for (int64_t k = 0; k < d; ++k) {
    const T* row = xt + k * ld;
    vec_t<T> b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = load(row + j + v * W);
    for (int i = 0; i < kRows; ++i) {
      const T a = row[i0 + i];
      for (int v = 0; v < kVecs; ++v) acc[i][v] += b[v] * a;
    }
  }
}

// Row r of the tile's result, columns [j, j + W): the entries on and above
// the diagonal (c >= r) that exist (c < n), zeros for those below it.
template <typename T>
inline void store_upper(T* out_row, int64_t r, int64_t j, int64_t n, vec_t<T> v) {
  constexpr int W = lanes<T>();
  if (j >= r && j + W <= n) return store(out_row + j, v);
  for (int64_t l = 0; l < W && j + l < n; ++l) out_row[j + l] = j + l >= r ? v[l] : T(0);
}

// xt (d, ld) = (X - shift)^T, with shift the column means (accumulated in
// double, rounded to T) when centring, and zero columns from n to ld.
template <typename T>
void transposed_centred(const at::Tensor& x, bool centre, T* xt, int64_t ld) {
  const int64_t n = x.size(0), d = x.size(1);
  const T* p = x.data_ptr<T>();
  std::vector<T> shift(d, T(0));
  if (centre && n > 0) {
    std::vector<double> sum(d, 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < d; ++k) sum[k] += static_cast<double>(p[i * d + k]);
    for (int64_t k = 0; k < d; ++k) shift[k] = static_cast<T>(sum[k] / static_cast<double>(n));
  }
  for (int64_t k = 0; k < d; ++k) std::fill(xt + k * ld + n, xt + (k + 1) * ld, T(0));
  // One vector of a row in, its lanes out to W rows of xt: the scalar
  // element-by-element transpose took a quarter of the op's time.
  constexpr int W = lanes<T>();
  const int64_t dv = d / W * W;
  for (int64_t i = 0; i < n; ++i) {
    const T* row = p + i * d;
    for (int64_t k0 = 0; k0 < dv; k0 += W) {
      const vec_t<T> v = load(row + k0) - load(shift.data() + k0);
      for (int l = 0; l < W; ++l) xt[(k0 + l) * ld + i] = v[l];
    }
    for (int64_t k = dv; k < d; ++k) xt[k * ld + i] = row[k] - shift[k];
  }
}

// This thread's scratch of at least `size` elements, kept between calls when
// it is at most kKeepBytes (release_large frees a larger one after its call).
constexpr size_t kKeepBytes = size_t(64) << 20;
template <typename T>
std::vector<T>& scratch(size_t size) {
  static thread_local std::vector<T> buffer;
  if (buffer.size() < size) buffer.resize(size);
  return buffer;
}
template <typename T>
void release_large(std::vector<T>& buffer) {
  if (buffer.capacity() * sizeof(T) > kKeepBytes) std::vector<T>().swap(buffer);
}

template <typename T>
at::Tensor gram_triu_typed(const std::vector<at::Tensor>& xs, bool centre) {
  constexpr int W = lanes<T>();
  const int64_t L = static_cast<int64_t>(xs.size()), n = xs[0].size(0);
  // Padding: a row tile reads xt's columns up to i0 + kRows, a column block up
  // to j + kVecs W with j < n; zero columns there compute zeros nobody stores.
  const int64_t ld = (n + kRows + kVecs * W + W - 1) / W * W;
  std::vector<int64_t> offset(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) offset[l + 1] = offset[l] + xs[l].size(1) * ld;
  // Why a kept scratch and 2 MB pages for the output: malloc serves blocks this large (MBs per
  // call) from fresh mmaps in some processes (its dynamic threshold depends on the process's
  // history), and their 4 KB page faults (2850 per call) tripled the op's time in those processes
  // (35 -> 97 ms per run of the layer_map benchmark, AMD EPYC).
  std::vector<T>& xt = scratch<T>(offset[L]);
  at::parallel_for(0, L, 1, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l)
      transposed_centred<T>(xs[l], centre, xt.data() + offset[l], ld);
  });

  // Every entry is written once: zeros left of each row's first tile, the rest by store_upper.
  at::Tensor out = empty_large(L * n * n, xs[0].options(), uintptr_t(2) << 20).view({L, n, n});
  T* o = out.data_ptr<T>();
  // Bands of rows, the costliest first (a band costs its width of the
  // triangle times d), so that the dynamic schedule ends balanced.
  std::vector<Task> tasks;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t r = 0; r < n; r += kBandRows) tasks.push_back({l, r, std::min(n, r + kBandRows)});
  const auto cost = [&](const Task& t) { return (n - t.r0) * xs[t.k].size(1); };
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const Task& a, const Task& b) { return cost(a) > cost(b); });
  run_tasks</*kFlush=*/false>(tasks, [&](const Task& t, int64_t) {
    const T* x = xt.data() + offset[t.k];
    const int64_t d = xs[t.k].size(1);
    T* g = o + t.k * n * n;
    for (int64_t i0 = t.r0; i0 < t.r1; i0 += kRows)
      for (int64_t i = i0; i < std::min(i0 + kRows, t.r1); ++i)
        std::fill(g + i * n, g + i * n + i0 / W * W, T(0));
    // Column blocks outside, the band's row tiles inside: a block's d x kVecs W slice of xt is
    // read from memory once per band and reused by its row tiles from cache (once per row tile,
    // the other way round, when xt outgrows L2 at large n). 16 layers of widths 256 / 512: n 2048
    // 151 against 165 ms, n 4096 (8 layers) 253 against 277 (AMD EPYC, best of 3 alternating runs).
    for (int64_t j = t.r0 / W * W; j < n; j += kVecs * W) {
      for (int64_t i0 = t.r0; i0 < t.r1; i0 += kRows) {
        if (j + kVecs * W <= i0 / W * W) continue;  // wholly left of the row tile's diagonal
        vec_t<T> acc[kRows][kVecs];
        gram_tile<T>(x, ld, d, i0, j, acc);
        for (int i = 0; i < kRows && i0 + i < t.r1; ++i)
          for (int v = 0; v < kVecs; ++v)
            store_upper<T>(g + (i0 + i) * n, i0 + i, j + v * W, n, acc[i][v]);
      }
    }
  });
  release_large(xt);
  return out;
}

}  // namespace

at::Tensor gram_triu_cpu(at::TensorList xs, bool centre) {
  TORCH_CHECK_VALUE(!xs.empty(), "xs must hold at least one tensor");
  const at::ScalarType dtype = xs[0].scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "xs must be float32 or float64, got ", dtype);
  std::vector<at::Tensor> mats;
  for (size_t l = 0; l < xs.size(); ++l) {
    const at::Tensor& x = xs[l];
    TORCH_CHECK_VALUE(x.dim() == 2, "xs[", l, "] must be 2-D (n, d), got shape ", x.sizes());
    TORCH_CHECK_VALUE(x.size(0) == xs[0].size(0),
                      "every tensor of xs must have n = ", xs[0].size(0), " rows, xs[", l, "] has ",
                      x.size(0));
    TORCH_CHECK_TYPE(x.scalar_type() == dtype, "every tensor of xs must be ", dtype, ", xs[", l,
                     "] is ", x.scalar_type());
    TORCH_CHECK_VALUE(x.device().is_cpu(), "xs[", l, "] must be on the CPU for this kernel");
    mats.push_back(x.contiguous());
  }
  return dtype == at::kFloat ? gram_triu_typed<float>(mats, centre)
                             : gram_triu_typed<double>(mats, centre);
}

}  // namespace tcfa
