// CPU kernel of tcfa::gated_stitch (the backward: gated_stitch_backward.cpp). The math
// is stated once, in the docstring of tcfa.ops.gated_stitch:
//   logits = x W_g + b_g,  g = softmax(logits / tau) over all C (dense) or over
//   the top-k logits (routed),  out = sum_c g_c (mu_y[c] + (x - mu_x[c]) U_c V_c).
//
// Dense: three large GEMMs (gate, shrink x.[U_1..U_C], expand .[V_1;..;V_C])
// with the per-block gate scaling fused into one pass between them.
// Routed: slot s of every row (its s-th largest gate) is processed in one
// pass; the rows of a pass are grouped by their selected condition with a
// counting sort, and each condition gets one task doing a small GEMM pair
// (microgemm.h) that reads its x rows in place by index and writes z
// and out rows directly. A row appears once per pass, so tasks write disjoint
// output rows (no atomics), and a condition is owned by one task per pass, so
// its parameter gradients need no reduction either. Unselected conditions are
// never touched. The shrink result z = (x - mu_x[c]) U_c of every selected
// (row, slot) is an output, kept by autograd so the backward skips that GEMM.
#include "gated_stitch.h"

#include "kernels.h"
#include "microgemm.h"

namespace tcfa {
namespace stitch {
namespace {

// Top-k of one row of logits, largest first, ties to the lower index (a
// strict > while scanning c upwards). NaN never compares greater, so the
// indices stay in range whatever the input. Then a softmax over the chosen.
template <typename T>
void topk_softmax(const T* logit, int64_t C, int64_t K, T inv_tau, T* gate, int64_t* idx) {
  int64_t filled = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T v = logit[c];
    if (filled == K && !(v > logit[idx[K - 1]])) continue;
    int64_t j = filled < K ? filled++ : K - 1;
    for (; j > 0 && v > logit[idx[j - 1]]; --j) idx[j] = idx[j - 1];
    idx[j] = c;
  }
  const T top = logit[idx[0]];
  T sum = 0;
  for (int64_t j = 0; j < K; ++j) sum += (gate[j] = std::exp((logit[idx[j]] - top) * inv_tau));
  for (int64_t j = 0; j < K; ++j) gate[j] /= sum;
}

// logits = x W_g + b_g with the micro-kernel, rows split across threads.
// Why not addmm: MKL's sgemm takes its generic AVX2 path on AMD CPUs
// (mkl_blas_def_sgemm_kernel_0_zen, ymm only), and even with its AVX-512
// kernels on Intel the addmm alone takes longer than this kernel plus the
// top-k; on AMD this kernel made the routed top-2 forward of `tcfa bench
// stitch` ~1.25x faster. Dense mode keeps addmm: its gate GEMM is small next
// to the shrink and expand.
at::Tensor gate_logits(const Params& p) {
  at::Tensor logits = at::empty({p.N, p.C}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "tcfa_gate_logits", [&] {
    using T = scalar_t;
    constexpr int W = lanes<T>();
    const at::Tensor Wp = pad_cols(p.W.unsqueeze(0), W).squeeze(0).contiguous();
    const int64_t cp = Wp.size(1), C = p.C, dx = p.dx;
    const T* xp = p.x.data_ptr<T>();
    const T* wp = Wp.data_ptr<T>();
    const T* bp = p.b.data_ptr<T>();
    T* lp = logits.data_ptr<T>();
    // Row blocks taken dynamically, not one static half per thread: when
    // another tenant slows one core, the other takes more blocks.
    run_tasks(row_tasks({0, p.N}, {1}, 96), [&](const Task& t, int64_t) {
      const int64_t n0 = t.r0, n1 = t.r1;
      std::vector<const T*> xrow(n1 - n0);
      for (int64_t n = n0; n < n1; ++n) xrow[n - n0] = xp + n * dx;
      rows_times<T, 6, 4>(
          xrow.data(), n1 - n0, dx, wp, cp, C, [&](int64_t i, int64_t j, vec_t<T> v) {
            const int64_t valid = std::min<int64_t>(W, C - j);
            store_valid<T>(lp + (n0 + i) * C + j, v + load_valid(bp + j, valid), valid);
          });
    });
  });
  return logits;
}

}  // namespace
}  // namespace stitch

// ------------------------------------------------------------------ forward
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_stitch_cpu(
    const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& gate_bias,
    const at::Tensor& U, const at::Tensor& V, const at::Tensor& mu_x, const at::Tensor& mu_y,
    c10::optional<int64_t> top_k, double temperature) {
  using namespace stitch;
  Params p = prepare(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k, temperature);
  const int64_t N = p.N, dx = p.dx, dy = p.dy, C = p.C, r = p.r, K = p.K;
  const bool dense = p.dense;
  const auto opt = p.x.options();
  at::Tensor logits = dense ? at::addmm(p.b, p.x, p.W) : gate_logits(p);  // (N, C)

  if (dense) {
    at::Tensor gates = at::softmax(logits / temperature, 1).contiguous();
    // shift_c = mu_x[c] U_c, so (x - mu_x[c]) U_c = x U_c - shift_c needs one GEMM.
    at::Tensor shift = at::bmm(p.mu_x.unsqueeze(1), p.U).reshape({C * r});
    at::Tensor s = at::mm(p.x, u_cat(p.U));  // (N, C*r), becomes g_c (x U_c - shift_c)
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "tcfa_gated_stitch_dense", [&] {
      using T = scalar_t;
      T* sp = s.data_ptr<T>();
      const T* gp = gates.data_ptr<T>();
      const T* sh = shift.data_ptr<T>();
      for_each_row_condition(N, C, [&](int64_t n, int64_t c) {
        T* blk = sp + (n * C + c) * r;
        const T g = gp[n * C + c];
        for (int64_t j = 0; j < r; ++j) blk[j] = g * (blk[j] - sh[c * r + j]);
      });
    });
    at::Tensor out = at::addmm(at::mm(gates, p.mu_y), s, p.V.reshape({C * r, dy}));
    return {out.to(x.scalar_type()), gates, at::empty({N, 0}, opt.dtype(at::kLong)),
            at::empty({N, 0, r}, opt)};
  }

  at::Tensor gates = at::empty({N, K}, opt);
  at::Tensor index = at::empty({N, K}, opt.dtype(at::kLong));
  at::Tensor z = at::empty({N, K, r}, opt);
  at::Tensor out = at::empty({N, dy}, opt);
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "tcfa_gated_stitch_routed", [&] {
    using T = scalar_t;
    const T* lp = logits.data_ptr<T>();
    T* gp = gates.data_ptr<T>();
    int64_t* ip = index.data_ptr<int64_t>();
    const T inv_tau = static_cast<T>(1.0 / temperature);
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        topk_softmax<T>(lp + n * C, C, K, inv_tau, gp + n * K, ip + n * K);
    });
    const SlotGroups groups = group_by_condition(index, C);
    const T* xp = p.x.data_ptr<T>();
    const T* myp = p.mu_y.data_ptr<T>();
    T* zp = z.data_ptr<T>();
    T* op = out.data_ptr<T>();
    constexpr int W = lanes<T>();
    // (x - mu_x[c]) U_c = x U_c - mu_x[c] U_c: the shift is one (C, r) GEMM,
    // so x rows are read in place instead of being copied and centred.
    const at::Tensor shift = at::bmm(p.mu_x.unsqueeze(1), p.U).squeeze(1).contiguous();
    const at::Tensor Up = pad_cols(p.U, W).contiguous(), Vp = pad_cols(p.V, W).contiguous();
    const int64_t rp = Up.size(2), dyp = Vp.size(2);
    const T* shp = shift.data_ptr<T>();
    const T* up = Up.data_ptr<T>();
    const T* vp = Vp.data_ptr<T>();
    for (int64_t s = 0; s < K; ++s) {
      for_each_condition(groups, s, [&](int64_t c, const int64_t* rows, int64_t n) {
        const std::vector<const T*> xrow = row_ptrs(xp, rows, n, dx);
        const std::vector<T*> zrow = row_ptrs(zp + s * r, rows, n, K * r);
        // z rows of the output, written in place (kept for the backward).
        const T* sh = shp + c * r;
        rows_times<T, 8, 2>(xrow.data(), n, dx, up + c * dx * rp, rp, r,
                            [&](int64_t i, int64_t j, vec_t<T> v) {
                              const int64_t valid = std::min<int64_t>(W, r - j);
                              store_valid<T>(zrow[i] + j, v - load_valid(sh + j, valid), valid);
                            });
        // out[row] (+)= g (mu_y[c] + z V_c); slot 0 holds every row once, so
        // it initialises out and later slots add.
        const T* my = myp + c * dy;
        rows_times<T, 6, 4>(static_cast<const T* const*>(zrow.data()), n, r, vp + c * r * dyp, dyp,
                            dy, [&](int64_t i, int64_t j, vec_t<T> v) {
                              const int64_t valid = std::min<int64_t>(W, dy - j);
                              const T g = gp[rows[i] * K + s];
                              T* o = op + rows[i] * dy + j;
                              vec_t<T> y = (v + load_valid(my + j, valid)) * g;
                              if (s > 0) y += load_valid(o, valid);
                              store_valid<T>(o, y, valid);
                            });
      });
    }
  });
  return {out.to(x.scalar_type()), gates, index, z};
}

}  // namespace tcfa
