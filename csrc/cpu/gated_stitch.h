// What the forward (gated_stitch.cpp) and the backward
// (gated_stitch_backward.cpp) of tcfa::gated_stitch share: the argument
// checks and conversions, and the grouping of routed rows by condition.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "tasks.h"

namespace tcfa {
namespace stitch {

struct Params {
  at::Tensor x, W, b, U, V, mu_x, mu_y;  // compute dtype, contiguous
  int64_t N, dx, dy, C, r;
  bool dense;  // top_k = None: softmax over all C conditions
  int64_t K;   // conditions per row: C when dense, else top_k
};

inline int64_t checked_k(const c10::optional<int64_t>& top_k, int64_t C) {
  if (!top_k.has_value()) return C;
  TORCH_CHECK_VALUE(*top_k >= 1 && *top_k <= C, "top_k must lie in [1, ", C, "], got ", *top_k);
  return *top_k;
}

// Bounds checks only; tcfa/ops/_validate.py names every bad argument first.
inline Params prepare(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b,
                      const at::Tensor& U, const at::Tensor& V, const at::Tensor& mu_x,
                      const at::Tensor& mu_y, const c10::optional<int64_t>& top_k,
                      double temperature) {
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "temperature must be > 0 and finite, got ", temperature);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, dx), got shape ", x.sizes());
  TORCH_CHECK_VALUE(U.dim() == 3, "U must be 3-D (C, dx, r), got shape ", U.sizes());
  const int64_t N = x.size(0), dx = x.size(1), C = U.size(0), r = U.size(2);
  TORCH_CHECK_VALUE(C >= 1, "U must hold at least one condition, got shape ", U.sizes());
  TORCH_CHECK_VALUE(U.size(1) == dx, "U must have shape (C, ", dx, ", r), got ", U.sizes());
  TORCH_CHECK_VALUE(V.dim() == 3 && V.size(0) == C && V.size(1) == r, "V must have shape (", C,
                    ", ", r, ", dy), got ", V.sizes());
  const int64_t dy = V.size(2);
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(0) == dx && W.size(1) == C,
                    "gate_weight must have shape (", dx, ", ", C, "), got ", W.sizes());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == C, "gate_bias must have shape (", C, ",), got ",
                    b.sizes());
  TORCH_CHECK_VALUE(mu_x.dim() == 2 && mu_x.size(0) == C && mu_x.size(1) == dx,
                    "mu_x must have shape (", C, ", ", dx, "), got ", mu_x.sizes());
  TORCH_CHECK_VALUE(mu_y.dim() == 2 && mu_y.size(0) == C && mu_y.size(1) == dy,
                    "mu_y must have shape (", C, ", ", dy, "), got ", mu_y.sizes());
  const auto dt = x.scalar_type();
  check_same_dtype(W, dt, "gate_weight");
  check_same_dtype(b, dt, "gate_bias");
  check_same_dtype(U, dt, "U");
  check_same_dtype(V, dt, "V");
  check_same_dtype(mu_x, dt, "mu_x");
  check_same_dtype(mu_y, dt, "mu_y");
  const auto ct = compute_dtype(dt);
  // Detached: the op is differentiated as a whole (tcfa/ops/__init__.py), and the
  // out= GEMMs below refuse inputs that require grad.
  auto cvt = [&](const at::Tensor& t) { return t.detach().to(ct).contiguous(); };
  return {cvt(x), cvt(W), cvt(b), cvt(U), cvt(V), cvt(mu_x),          cvt(mu_y),
          N,      dx,     dy,     C,      r,      !top_k.has_value(), checked_k(top_k, C)};
}

// [U_1 ... U_C] as one (dx, C*r) matrix and [V_1; ...; V_C] as (C*r, dy).
inline at::Tensor u_cat(const at::Tensor& U) {
  return U.permute({1, 0, 2}).reshape({U.size(1), U.size(0) * U.size(2)});
}

// Rows grouped by the condition selected in each slot: for slot s, the rows
// with index[n, s] == c are rows[s][start[s][c] .. start[s][c+1]).
struct SlotGroups {
  std::vector<std::vector<int64_t>> rows, start;
};

inline SlotGroups group_by_condition(const at::Tensor& index, int64_t C) {
  const int64_t N = index.size(0), K = index.size(1);
  const int64_t* ip = index.data_ptr<int64_t>();
  SlotGroups g{std::vector<std::vector<int64_t>>(K, std::vector<int64_t>(N)),
               std::vector<std::vector<int64_t>>(K, std::vector<int64_t>(C + 1, 0))};
  for (int64_t s = 0; s < K; ++s) {  // counting sort, stable in n
    auto& st = g.start[s];
    for (int64_t n = 0; n < N; ++n) ++st[ip[n * K + s] + 1];
    for (int64_t c = 0; c < C; ++c) st[c + 1] += st[c];
    std::vector<int64_t> next(st.begin(), st.end() - 1);
    for (int64_t n = 0; n < N; ++n) g.rows[s][next[ip[n * K + s]]++] = n;
  }
  return g;
}

// One task per condition that has rows in slot s.
inline std::vector<Task> condition_tasks(const SlotGroups& g, int64_t s) {
  std::vector<Task> tasks;
  const auto& st = g.start[s];
  for (int64_t c = 0; c + 1 < static_cast<int64_t>(st.size()); ++c)
    if (st[c + 1] > st[c]) tasks.push_back({c, st[c], st[c + 1]});
  return tasks;
}

// Pointers base + rows[i] * stride, i < n: the rows of a condition's group,
// read or written in place by the micro-kernels.
template <typename P>
std::vector<P*> row_ptrs(P* base, const int64_t* rows, int64_t n, int64_t stride) {
  std::vector<P*> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = base + rows[i] * stride;
  return out;
}

// Dense mode: runs fn(n, c) for every row n and condition c, rows split
// across threads.
template <typename Fn> void for_each_row_condition(int64_t N, int64_t C, Fn fn) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = 0; c < C; ++c) fn(n, c);
  });
}

// Runs fn(c, rows, n) for every condition c with rows in slot s, one task
// each: rows[0 .. n) are the rows of that slot that selected c.
template <typename Fn> void for_each_condition(const SlotGroups& g, int64_t s, Fn fn) {
  run_tasks(condition_tasks(g, s),
            [&](const Task& t, int64_t) { fn(t.k, g.rows[s].data() + t.r0, t.r1 - t.r0); });
}

}  // namespace stitch
}  // namespace tcfa
