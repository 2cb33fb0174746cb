// CPU kernel of tcfa::barycentric; the math is stated once, in tcfa/ops/__init__.py.
// FlashAttention-style: per tile of 128 x rows and 512 y rows, a GEMM for the
// scores, an online row max, exp in place, and acc += W @ v_tile.
#include "checks.h"
#include "cost.h"
#include "exp.h"
#include "kernels.h"
#include "tasks.h"
#include "vec.h"

namespace tcfa {
namespace {
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;
}  // namespace

at::Tensor barycentric_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_offsets,
                           const at::Tensor& y_offsets, const at::Tensor& g,
                           const at::Tensor& log_b, const at::Tensor& values, double eps,
                           c10::string_view cost) {
  const Cost kind = parse_cost(cost);
  check_eps(eps);
  check_point_pair(x, y);
  check_rows(g, y.size(0), "g");
  check_rows(log_b, y.size(0), "log_b");
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == y.size(0),
                    "values must be 2-D with one row per row of y (", y.size(0), "), got shape ",
                    values.sizes());
  const RaggedPair rp = ragged_pair(x_offsets, x.size(0), y_offsets, y.size(0));
  const auto& yo = rp.yo;
  // sum_j pi_ij = 0 when a problem has x rows but no y row of positive weight:
  // T_i = 0/0. Refuse it by name rather than return NaN.
  {
    const at::Tensor lb = log_b.to(at::kDouble).to(at::kCPU).contiguous();
    const double* p = lb.data_ptr<double>();
    for (int64_t k = 0; k < rp.B; ++k) {
      if (rp.xo[k + 1] == rp.xo[k]) continue;
      bool mass = false;
      for (int64_t j = yo[k]; j < yo[k + 1] && !mass; ++j) mass = p[j] > -INFINITY;
      TORCH_CHECK_VALUE(mass, "log_b: problem ", k,
                        " has x rows but no y row of positive weight "
                        "(log_b = -inf everywhere or no y rows), so its barycentric map is 0/0");
    }
  }
  const auto ct = compute_dtype(x.scalar_type());
  AffineRows ax = affine_rows(x.to(ct), kind), ay = affine_rows(y.to(ct), kind);
  at::Tensor v = values.to(ct).contiguous();
  // alpha_i is constant along a row and cancels in the normalisation.
  at::Tensor u = (log_b.to(ct) + (g.to(ct) - ay.norm) / eps).contiguous();
  const int64_t dv = v.size(1);
  at::Tensor out = at::zeros({x.size(0), dv}, ax.rows.options());

  AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_barycentric", [&] {
    using T = scalar_t;
    constexpr int W = lanes<T>();
    const T* up = u.data_ptr<T>();
    const T scale = static_cast<T>(cost_gamma(kind) / eps);
    run_tasks(row_tasks(rp.xo, std::vector<uint8_t>(rp.B, 1), kRowBlock), [&](const Task& t,
                                                                              int64_t) {
      const int64_t nr = t.r1 - t.r0;
      std::vector<T> mx(nr, lowest<T>()), sum(nr, T(0)), resc(nr);
      at::Tensor acc = at::zeros({nr, dv}, ax.rows.options());
      at::Tensor xb = ax.rows.narrow(0, t.r0, nr);
      for (int64_t j0 = yo[t.k]; j0 < yo[t.k + 1]; j0 += kColBlock) {
        const int64_t nj = std::min(kColBlock, yo[t.k + 1] - j0);
        at::Tensor s = at::mm(xb, ay.rows.narrow(0, j0, nj).t());
        T* sp = s.data_ptr<T>();
        for (int64_t i = 0; i < nr; ++i) {
          T* row = sp + i * nj;
          vec_t<T> vm = splat<T>(lowest<T>());
          for (int64_t j = 0; j < nj; j += W) {  // scores, then the tile's row max
            const int left = static_cast<int>(std::min<int64_t>(W, nj - j));
            vec_t<T> val =
                (left == W ? load(up + j0 + j) : load_partial<T>(up + j0 + j, left, -INFINITY)) +
                splat<T>(scale) *
                    (left == W ? load(row + j) : load_partial<T>(row + j, left, T(0)));
            if (left == W)
              store(row + j, val);
            else
              for (int l = 0; l < left; ++l) row[j + l] = val[l];
            vm = vmax<T>(vm, val);
          }
          const T nm = std::max(mx[i], hmax<T>(vm));
          resc[i] = std::exp(mx[i] - nm);
          mx[i] = nm;
          vec_t<T> vs = splat<T>(T(0));
          for (int64_t j = 0; j < nj; j += W) {  // weights exp(score - max), in place
            const int left = static_cast<int>(std::min<int64_t>(W, nj - j));
            vec_t<T> w = vexp<T, true>(
                (left == W ? load(row + j) : load_partial<T>(row + j, left, -INFINITY)) - nm);
            if (left == W)
              store(row + j, w);
            else
              for (int l = 0; l < left; ++l) row[j + l] = w[l];
            vs += w;
          }
          sum[i] = sum[i] * resc[i] + hsum<T>(vs);
        }
        acc.mul_(at::from_blob(resc.data(), {nr, 1}, ax.rows.options()));
        acc.addmm_(s, v.narrow(0, j0, nj));
      }
      at::Tensor denom = at::from_blob(sum.data(), {nr, 1}, ax.rows.options());
      out.narrow(0, t.r0, nr).copy_(acc / denom);
    });
  });
  return out.to(values.scalar_type());
}

}  // namespace tcfa
