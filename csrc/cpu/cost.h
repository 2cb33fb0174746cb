// The costs of the point-cloud kernels, affine in x.y (docs/architecture.md,
// "Ragged batches"): C_ij = alpha_i + beta_j - gamma x_i.y_j.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cstdint>
#include <string>

#include "vec.h"

namespace tcfa {

enum class Cost { SqEuclidean, Cosine };

inline Cost parse_cost(c10::string_view s) {
  if (s == "sqeuclidean") return Cost::SqEuclidean;
  if (s == "cosine") return Cost::Cosine;
  TORCH_CHECK_VALUE(false, "cost must be 'sqeuclidean' or 'cosine', got '", std::string(s), "'");
  return Cost::SqEuclidean;
}

// Rows prepared for the affine form: cosine rows are normalised (so alpha =
// beta = 1, gamma = 1); sqeuclidean keeps rows and uses squared norms, gamma = 2.
struct AffineRows {
  at::Tensor rows;  // (N, d), contiguous, compute dtype
  at::Tensor norm;  // (N,), the alpha (or beta) term
};

// |x_i|^2 per row of a contiguous (N, d) tensor, without the (N, d)
// temporary of (x * x).sum(1): that extra pair of passes over the rows cost
// about a tenth of a 64-problem batch solve (`tcfa bench sinkhorn`, case C).
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

}  // namespace tcfa
