// Argument checks of the CPU kernels. The Python API validates everything once
// (tcfa/ops/_validate.py) and names the argument; these checks only guarantee that
// a direct torch.ops call can never read or write out of bounds.
// TORCH_CHECK_VALUE surfaces as ValueError, TORCH_CHECK_TYPE as TypeError.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tcfa {

inline std::vector<int64_t> checked_offsets(const at::Tensor& off, int64_t n_rows,
                                            const char* name) {
  TORCH_CHECK_TYPE(off.scalar_type() == at::kLong, name, " must be int64, got ", off.scalar_type());
  TORCH_CHECK_VALUE(off.dim() == 1 && off.numel() >= 2, name,
                    " must be 1-D with B+1 >= 2 entries, got shape ", off.sizes());
  auto c = off.to(at::kCPU).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + c.numel());
  TORCH_CHECK_VALUE(v.front() == 0, name, " must start at 0, got ", v.front());
  TORCH_CHECK_VALUE(v.back() == n_rows, name, " must end at the number of rows (", n_rows,
                    "), got ", v.back());
  for (size_t k = 1; k < v.size(); ++k)
    TORCH_CHECK_VALUE(v[k] >= v[k - 1], name, " must be non-decreasing, got ", v[k - 1], " then ",
                      v[k], " at position ", k);
  return v;
}

// A ragged batch of B problems: x rows [xo[k], xo[k+1]) against y rows
// [yo[k], yo[k+1]); a stored cost keeps problem k's n_k x m_k block,
// row-major, at [co[k], co[k+1]) of one flat buffer.
struct RaggedPair {
  std::vector<int64_t> xo, yo, co;
  int64_t B;
};

inline RaggedPair ragged_pair(const at::Tensor& x_offsets, int64_t nx, const at::Tensor& y_offsets,
                              int64_t ny) {
  RaggedPair r;
  r.xo = checked_offsets(x_offsets, nx, "x_offsets");
  r.yo = checked_offsets(y_offsets, ny, "y_offsets");
  TORCH_CHECK_VALUE(r.xo.size() == r.yo.size(),
                    "x_offsets and y_offsets must describe "
                    "the same number of problems, got ",
                    r.xo.size() - 1, " and ", r.yo.size() - 1);
  r.B = static_cast<int64_t>(r.xo.size()) - 1;
  r.co.assign(r.B + 1, 0);
  for (int64_t k = 0; k < r.B; ++k)
    r.co[k + 1] = r.co[k] + (r.xo[k + 1] - r.xo[k]) * (r.yo[k + 1] - r.yo[k]);
  return r;
}

inline void check_rows(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ",
                    t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, name, " must have dtype ", dt, ", got ", t.scalar_type());
}

// Per-problem flags (active: "still iterating", symmetric: one potential); an undefined
// tensor gives `absent` for every problem.
inline std::vector<uint8_t> problem_flags(const c10::optional<at::Tensor>& flags, int64_t B,
                                          const char* name, bool absent = true) {
  std::vector<uint8_t> out(B, absent);
  if (flags.has_value() && flags->defined()) {
    TORCH_CHECK_TYPE(flags->scalar_type() == at::kBool, name, " must be bool, got ",
                     flags->scalar_type());
    TORCH_CHECK_VALUE(flags->dim() == 1 && flags->size(0) == B, name, " must have shape (", B,
                      ",), got ", flags->sizes());
    auto c = flags->to(at::kCPU).contiguous();
    const bool* p = c.data_ptr<bool>();
    for (int64_t k = 0; k < B; ++k) out[k] = p[k];
  }
  return out;
}

// The stored costs of tcfa::softmin_dense and tcfa::sinkhorn_dense: one flat
// buffer holding every problem's n_k x m_k block, with n_k and m_k given by
// the offsets over the rows of log_a and log_b.
inline RaggedPair ragged_cost(const at::Tensor& cost, const at::Tensor& x_offsets,
                              const at::Tensor& y_offsets, const at::Tensor& log_a,
                              const at::Tensor& log_b) {
  TORCH_CHECK_VALUE(cost.dim() == 1,
                    "cost must be the flat concatenation of the "
                    "problems' row-major costs (1-D), got shape ",
                    cost.sizes());
  TORCH_CHECK_VALUE(log_a.dim() == 1 && log_b.dim() == 1, "log_a and log_b must be 1-D");
  RaggedPair rp = ragged_pair(x_offsets, log_a.size(0), y_offsets, log_b.size(0));
  TORCH_CHECK_VALUE(cost.numel() == rp.co[rp.B], "cost must hold sum_k n_k*m_k = ", rp.co[rp.B],
                    " entries for these offsets, got ", cost.numel());
  return rp;
}

// Point clouds x (N, d) and y (M, d) of one dtype.
inline void check_point_pair(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
                    "x and y must be 2-D with the same width, got shapes ", x.sizes(), " and ",
                    y.sizes());
  check_same_dtype(y, x.scalar_type(), "y");
}

inline void check_eps(double eps) { TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps); }

// fp16/bf16 inputs are computed in fp32 (tcfa/ops/_validate.py: compute_dtype).
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Problems flagged symmetric in tcfa::sinkhorn_dense are one measure against itself: square,
// the same weights on both sides and the same marginal relaxation (the cost's symmetry is the
// caller's promise: checking it would read the whole cost).
inline void check_symmetric(const std::vector<uint8_t>& sym, const RaggedPair& rp,
                            const at::Tensor& log_a, const at::Tensor& log_b, double tau_a,
                            double tau_b) {
  if (std::find(sym.begin(), sym.end(), 1) == sym.end()) return;
  TORCH_CHECK_VALUE(tau_a == tau_b, "symmetric problems need tau_a == tau_b, got ", tau_a, " and ",
                    tau_b);
  for (int64_t k = 0; k < rp.B; ++k) {
    if (!sym[k]) continue;
    const int64_t n = rp.xo[k + 1] - rp.xo[k];
    TORCH_CHECK_VALUE(n == rp.yo[k + 1] - rp.yo[k], "symmetric problem ", k,
                      " must be square, got ", n, " x ", rp.yo[k + 1] - rp.yo[k]);
    TORCH_CHECK_VALUE(at::equal(log_a.narrow(0, rp.xo[k], n), log_b.narrow(0, rp.yo[k], n)),
                      "symmetric problem ", k, " must have log_a equal to log_b");
  }
}

}  // namespace tcfa
