// CPU kernels of tcfa::softmin (cost on the fly), tcfa::softmin_dense (stored
// cost) and tcfa::cost. The math is stated once, in tcfa/ops/__init__.py.
#include "checks.h"
#include "cost.h"
#include "dense_columns.h"
#include "kernels.h"
#include "large_buffer.h"
#include "lse.h"
#include "tasks.h"

namespace tcfa {
namespace {

// Row tile of the on-the-fly cost. 128 x 512 fp32 scores = 256 KB stay in the
// 1 MB L2 while the log-sum-exp pass reads them back right after the GEMM.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;

struct Prepared {
  at::Tensor x, y, h, log_b;  // compute dtype, contiguous
};

Prepared prepare(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                 const at::Tensor& log_b) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, d), got shape ", x.sizes());
  TORCH_CHECK_VALUE(y.dim() == 2, "y must be 2-D (M, d), got shape ", y.sizes());
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), "x and y must have the same width, got ", x.size(1),
                    " and ", y.size(1));
  check_same_dtype(y, x.scalar_type(), "y");
  check_rows(h, y.size(0), "h");
  check_rows(log_b, y.size(0), "log_b");
  const auto ct = compute_dtype(x.scalar_type());
  auto cvt = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  return {cvt(x), cvt(y), cvt(h), cvt(log_b)};
}

}  // namespace

at::Tensor softmin_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_offsets,
                       const at::Tensor& y_offsets, const at::Tensor& h, const at::Tensor& log_b,
                       double eps, c10::string_view cost, const c10::optional<at::Tensor>& active) {
  const Cost kind = parse_cost(cost);
  check_eps(eps);
  Prepared p = prepare(x, y, h, log_b);
  const RaggedPair rp = ragged_pair(x_offsets, x.size(0), y_offsets, y.size(0));
  const auto &xo = rp.xo, &yo = rp.yo;
  auto flags = problem_flags(active, rp.B, "active");
  AffineRows ax = affine_rows(p.x, kind), ay = affine_rows(p.y, kind);
  // C_ij = alpha_i + beta_j - gamma x_i.y_j, so the exponent splits into a
  // column term u_j = log b_j + (h_j - beta_j)/eps and (gamma/eps) x_i.y_j.
  at::Tensor u = (p.log_b + (p.h - ay.norm) / eps).contiguous();
  at::Tensor out = at::zeros({x.size(0)}, p.x.options());
  const double gamma = cost_gamma(kind);

  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "tcfa_softmin", [&] {
    using T = scalar_t;
    const T* up = u.data_ptr<T>();
    const T* alpha = ax.norm.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T scale = static_cast<T>(gamma / eps);
    run_tasks(row_tasks(xo, flags, kRowBlock), [&](const Task& t, int64_t) {
      std::vector<LseState<T>> st(t.r1 - t.r0);
      at::Tensor xb = ax.rows.narrow(0, t.r0, t.r1 - t.r0);
      for (int64_t j0 = yo[t.k]; j0 < yo[t.k + 1]; j0 += kColBlock) {
        const int64_t nj = std::min(kColBlock, yo[t.k + 1] - j0);
        at::Tensor s = at::mm(xb, ay.rows.narrow(0, j0, nj).t());  // (rows, nj)
        const T* sp = s.data_ptr<T>();
        for (int64_t i = 0; i < t.r1 - t.r0; ++i) st[i].add_affine(up + j0, sp + i * nj, scale, nj);
      }
      for (int64_t i = t.r0; i < t.r1; ++i)
        op[i] = alpha[i] - static_cast<T>(eps) * st[i - t.r0].result();
    });
  });
  return out.to(x.scalar_type());
}

at::Tensor softmin_dense_cpu(const at::Tensor& cost, const at::Tensor& x_offsets,
                             const at::Tensor& y_offsets, const at::Tensor& log_a,
                             const at::Tensor& log_b, const at::Tensor& h, double eps, int64_t dim,
                             const c10::optional<at::Tensor>& active) {
  check_eps(eps);
  TORCH_CHECK_VALUE(dim == 0 || dim == 1, "dim must be 0 or 1, got ", dim);
  const RaggedPair rp = ragged_cost(cost, x_offsets, y_offsets, log_a, log_b);
  const int64_t nx = log_a.size(0), ny = log_b.size(0);
  const auto &xo = rp.xo, &yo = rp.yo, &co = rp.co;
  const int64_t B = rp.B;
  // dim=1 reduces over y's rows (output per x row, weights b, h on y),
  // dim=0 over x's rows (output per y row, weights a, h on x).
  const at::Tensor& log_w = dim == 1 ? log_b : log_a;
  check_rows(h, log_w.size(0), "h");
  auto flags = problem_flags(active, B, "active");
  const auto ct = compute_dtype(cost.scalar_type());
  at::Tensor c = cost.to(ct).contiguous();
  at::Tensor u = (log_w.to(ct) + h.to(ct) / eps).contiguous();  // log w + h/eps
  at::Tensor out = at::zeros({dim == 1 ? nx : ny}, c.options());

  AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_softmin_dense", [&] {
    using T = scalar_t;
    const T* cp = c.data_ptr<T>();
    const T* up = u.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T neg_inv_eps = static_cast<T>(-1.0 / eps);
    const T eps_t = static_cast<T>(eps);
    if (dim == 1) {
      run_tasks(row_tasks(xo, flags, kDenseRowBlock), [&](const Task& t, int64_t) {
        const int64_t m = yo[t.k + 1] - yo[t.k];
        for (int64_t i = t.r0; i < t.r1; ++i) {
          LseState<T> st;
          st.add_affine(up + yo[t.k], cp + co[t.k] + (i - xo[t.k]) * m, neg_inv_eps, m);
          op[i] = -eps_t * st.result();
        }
      });
      return;
    }
    column_softmin<T>(cp, rp, flags, up, eps_t, op);
  });
  return out.to(h.scalar_type());
}

at::Tensor cost_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_offsets,
                    const at::Tensor& y_offsets, c10::string_view cost) {
  const Cost kind = parse_cost(cost);
  check_point_pair(x, y);
  const RaggedPair rp = ragged_pair(x_offsets, x.size(0), y_offsets, y.size(0));
  const auto &xo = rp.xo, &yo = rp.yo, &co = rp.co;
  const int64_t B = rp.B;
  const auto ct = compute_dtype(x.scalar_type());
  AffineRows ax = affine_rows(x.to(ct), kind), ay = affine_rows(y.to(ct), kind);
  at::Tensor out = empty_large(co[B], ax.rows.options());
  const double gamma = cost_gamma(kind);
  AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_cost", [&] {
    using T = scalar_t;
    const T* alpha = ax.norm.data_ptr<T>();
    const T* beta = ay.norm.data_ptr<T>();
    T* op = out.data_ptr<T>();
    run_tasks(row_tasks(xo, std::vector<uint8_t>(B, 1), kRowBlock), [&](const Task& t, int64_t) {
      const int64_t m = yo[t.k + 1] - yo[t.k];
      if (m == 0) return;
      // x.y straight into this task's rows of the output, then the affine
      // terms in place: a temporary product cost a second pass over the
      // n x m block and fresh pages for every task.
      const int64_t first = co[t.k] + (t.r0 - xo[t.k]) * m;
      at::Tensor block = out.narrow(0, first, (t.r1 - t.r0) * m).view({t.r1 - t.r0, m});
      at::mm_out(block, ax.rows.narrow(0, t.r0, t.r1 - t.r0), ay.rows.narrow(0, yo[t.k], m).t());
      for (int64_t i = t.r0; i < t.r1; ++i) {
        T* dst = op + first + (i - t.r0) * m;
        for (int64_t j = 0; j < m; ++j) {
          // clamp: rounding of |x|^2 + |y|^2 - 2 x.y can dip below zero
          const T c = alpha[i] + beta[yo[t.k] + j] - static_cast<T>(gamma) * dst[j];
          dst[j] = c > T(0) ? c : T(0);
        }
      }
    });
  });
  return out;
}

}  // namespace tcfa
