// CPU kernel of tcfa::gated_stitch_backward (the forward and the plan of both
// modes: gated_stitch.cpp). With dout the gradient of out, for each selected
// (row, condition c) pair:
//   dS = dout V_c^T,  dg_c = dout.mu_y[c] + dS.z,  dz = g_c dS,
//   dV_c += (g_c z)^T dout,  dmu_y[c] += g_c dout,  dU_c += (x - mu_x[c])^T dz,
//   dx += dz U_c^T,  dmu_x[c] -= dz U_c^T,
// then the softmax over the selected logits: dlogit = g (dg - sum g dg) / tau
// (zero for unselected logits: the top-k choice is piecewise constant), and
//   dW_g = x^T dlogit,  db_g = sum_n dlogit,  dx += dlogit W_g^T.
#include "gated_stitch.h"
#include "kernels.h"
#include "microgemm.h"

namespace tcfa {
namespace stitch {
namespace {

// The gradients, in the compute dtype, in the order of the op's outputs.
struct Grads {
  at::Tensor dx, dW, db, dU, dV, dmu_x, dmu_y;
};

// Dense: every condition of every row, as large GEMMs around one fused pass.
Grads dense_backward(const Params& p, const at::Tensor& dout, const at::Tensor& g, double inv_tau) {
  const int64_t N = p.N, dx = p.dx, dy = p.dy, C = p.C, r = p.r;
  Grads d;
  at::Tensor Ucat = u_cat(p.U).contiguous(), Vcat = p.V.reshape({C * r, dy});
  at::Tensor shift = at::bmm(p.mu_x.unsqueeze(1), p.U).reshape({C * r});
  // Recomputed rather than kept: the Triton kernel never writes this N x C*r
  // block, and both backends share one autograd formula.
  at::Tensor zs = at::mm(p.x, Ucat);                      // z, then g z
  at::Tensor ds = at::mm(dout, Vcat.t());                 // dS, then dz = g dS
  at::Tensor dg = at::mm(dout, p.mu_y.t()).contiguous();  // (N, C), then + dS.z
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "tcfa_gated_stitch_dense_bwd", [&] {
    using T = scalar_t;
    T* zp = zs.data_ptr<T>();
    T* dsp = ds.data_ptr<T>();
    T* dgp = dg.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    const T* sh = shift.data_ptr<T>();
    for_each_row_condition(N, C, [&](int64_t n, int64_t c) {
      T* zb = zp + (n * C + c) * r;
      T* db_ = dsp + (n * C + c) * r;
      const T gc = gp[n * C + c];
      T dot = 0;
      for (int64_t j = 0; j < r; ++j) {
        const T zj = zb[j] - sh[c * r + j];
        dot += db_[j] * zj;
        zb[j] = gc * zj;
        db_[j] *= gc;
      }
      dgp[n * C + c] += dot;
    });
  });
  d.dV = at::mm(zs.t(), dout).reshape({C, r, dy});
  d.dmu_y = at::mm(g.t(), dout);
  at::Tensor dz_sum = ds.sum(0).reshape({C, r});
  d.dU = at::mm(p.x.t(), ds).reshape({dx, C, r}).permute({1, 0, 2}).contiguous();
  d.dU.sub_(at::bmm(p.mu_x.unsqueeze(2), dz_sum.unsqueeze(1)));  // (x - mu_x)^T dz
  d.dmu_x = -at::bmm(p.U, dz_sum.unsqueeze(2)).squeeze(2);
  at::Tensor dlogit = g * (dg - (g * dg).sum(1, true)) * inv_tau;
  d.dx = at::mm(ds, Ucat.t());
  d.dx.addmm_(dlogit, p.W.t());
  d.dW = at::mm(p.x.t(), dlogit);
  d.db = dlogit.sum(0);
  return d;
}

// The routed backward's operands as raw pointers. Every per-condition product
// runs on the micro-kernels, reading dout and x rows in place by index (no
// gathered copies, no MKL):
//   dS = dout V_c^T and dx += dz U_c^T by rows_times (B = V_c^T, U_c^T
//   padded), dV_c (with dmu_y[c] as an extra row) and dU_c^T = dz^T x (with
//   dW_g[:, c]^T = dlogit^T x as an extra row) by rows_times_rows, reducing
//   over the condition's rows.
// dU_c = x^T dz - mu_x[c] (sum dz) and dmu_x[c] = -U_c sum dz are finished
// after the passes from the per-condition sums of dz. Together the passes
// make the routed top-2 backward of `tcfa bench stitch` take about twice the
// forward's time.
template <typename T> struct Routed {
  const SlotGroups& groups;
  int64_t N, K, dx, dy, r;
  int64_t ldo;      // dout row stride: 0 for a gradient broadcast along rows
  int64_t rp, dxp;  // r and dx padded to whole vectors
  const T *xp, *myp, *gp, *zp, *dop, *vtp, *utp, *wtp;  // vtp, utp: V^T, U^T padded
  const int64_t* ip;                                    // the selected conditions, (N, K)
  T *dzap, *dlp;  // dz of every (row, slot), padded to rp; dg, then dlogit
  T *dvp, *dmyp, *dutp, *dwp, *dbp, *dzsp;  // dV, dmu_y, dU^T, dW_g^T, db, sum dz
  T* dxo;                                   // dx

  // Pass A1: dz = g dS (kept in dz_all) and dg of every (row, slot).
  void dz_and_dg(int64_t s) const {
    for_each_condition(groups, s, [&](int64_t c, const int64_t* rows, int64_t n) {
      const std::vector<const T*> drow = row_ptrs(dop, rows, n, ldo);
      const std::vector<T*> dsrow = row_ptrs(dzap + s * rp, rows, n, K * rp);
      rows_times<T, 8, 2>(drow.data(), n, dy, vtp + c * dy * rp, rp, r,
                          [&](int64_t i, int64_t j, vec_t<T> v) { store(dsrow[i] + j, v); });
      const T* my = myp + c * dy;
      for (int64_t i = 0; i < n; ++i) {
        const T gi = gp[rows[i] * K + s];
        const T* zi = zp + (rows[i] * K + s) * r;
        T* dsi = dsrow[i];
        dlp[rows[i] * K + s] = dot_row<T>(drow[i], my, dy) + dot_row<T>(dsi, zi, r);
        for (int64_t j = 0; j < r; ++j) dsi[j] *= gi;
      }
    });
  }

  // Softmax over the selected logits, row by row: dlogit = g (dg - sum g dg) / tau.
  void logit_grad(double inv_tau) const {
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        T* dl = dlp + n * K;
        const T* gn = gp + n * K;
        T mean = 0;
        for (int64_t j = 0; j < K; ++j) mean += gn[j] * dl[j];
        for (int64_t j = 0; j < K; ++j) dl[j] = gn[j] * (dl[j] - mean) * T(inv_tau);
      }
    });
  }

  // An epilogue adding row i of a product to (i < r ? rows + i * ld : last),
  // the first `ld` columns.
  static auto accumulate(T* rows, T* last, int64_t r, int64_t ld) {
    return [=](int64_t i, int64_t j, vec_t<T> v) {
      const int64_t valid = std::min<int64_t>(lanes<T>(), ld - j);
      T* o = (i < r ? rows + i * ld : last) + j;
      store_valid<T>(o, v + load_valid(o, valid), valid);
    };
  }

  // Pass A2: the parameter gradients. The logit gradient rides along as an
  // extra row of dz^T, so dW_g[:, c] = x^T dlogit comes out of the same sweep
  // over x rows as dU_c: a separate pass over x for the gate's gradient would
  // read x twice more (K slots).
  void param_grads(int64_t s) const {
    for_each_condition(groups, s, [&](int64_t c, const int64_t* rows, int64_t n) {
      const std::vector<const T*> drow = row_ptrs(dop, rows, n, ldo);
      const std::vector<const T*> xrow = row_ptrs(xp, rows, n, dx);
      std::vector<const T*> arow(r + 1), dzrow(r + 1);
      // gzt: (r + 1, n) rows of (g z)^T then g; dzt: (r + 1, n) dz^T then dlogit.
      std::vector<T> gzt((r + 1) * n), dzt((r + 1) * n);
      for (int64_t j = 0; j <= r; ++j) arow[j] = gzt.data() + j * n, dzrow[j] = dzt.data() + j * n;
      T* dzs = dzsp + c * r;
      for (int64_t i = 0; i < n; ++i) {
        const T gi = gp[rows[i] * K + s];
        const T* zi = zp + (rows[i] * K + s) * r;
        const T* dzi = dzap + (rows[i] * K + s) * rp;
        for (int64_t j = 0; j < r; ++j) {
          dzt[j * n + i] = dzi[j];
          gzt[j * n + i] = gi * zi[j];
          dzs[j] += dzi[j];
        }
        gzt[r * n + i] = gi;
        dzt[r * n + i] = dlp[rows[i] * K + s];
        dbp[c] += dlp[rows[i] * K + s];
      }
      // dV_c += (g z)^T dout, dmu_y[c] += g^T dout.
      rows_times_rows<T, 11, 2>(arow.data(), r + 1, n, drow.data(), dy,
                                accumulate(dvp + c * r * dy, dmyp + c * dy, r, dy));
      // dU_c^T += dz^T x and dW_g^T[c] += dlogit^T x.
      rows_times_rows<T, 8, 3>(dzrow.data(), r + 1, n, xrow.data(), dx,
                               accumulate(dutp + c * r * dx, dwp + c * dx, r, dx));
    });
  }

  // Pass B: dx[row] = sum_s dz U_c^T + sum_s dlogit[row, s] W_g[:, c_s]^T.
  // The logit gradient has K nonzeros per row, so the gate GEMM shrinks to K
  // axpys per row, fused into slot 0's epilogue; slot 0 holds every row once,
  // so it writes dx (no zero fill) and later slots add: dx (N x dx) is written
  // once and read-modified K - 1 times instead of zero-filled, updated K times
  // and once more by the gate.
  void input_grad(int64_t s) const {
    constexpr int W = lanes<T>();
    for_each_condition(groups, s, [&](int64_t c, const int64_t* rows, int64_t n) {
      const std::vector<const T*> dzr = row_ptrs<const T>(dzap + s * rp, rows, n, K * rp);
      rows_times<T, 6, 4>(
          dzr.data(), n, r, utp + c * r * dxp, dxp, dx, [&](int64_t i, int64_t j, vec_t<T> v) {
            const int64_t valid = std::min<int64_t>(W, dx - j), row = rows[i];
            T* o = dxo + row * dx + j;
            if (s == 0) {
              for (int64_t q = 0; q < K; ++q)
                v += load_valid(wtp + ip[row * K + q] * dx + j, valid) * dlp[row * K + q];
            } else {
              v += load_valid(o, valid);
            }
            store_valid<T>(o, v, valid);
          });
    });
  }
};

// Routed: only the selected (row, condition) pairs, grouped by condition.
Grads routed_backward(const Params& p, const at::Tensor& dout, int64_t ldo, const at::Tensor& g,
                      const at::Tensor& index, const at::Tensor& z, double inv_tau) {
  const int64_t N = p.N, dx = p.dx, dy = p.dy, C = p.C, r = p.r, K = p.K;
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == N && index.size(1) == K,
                    "index must have shape (", N, ", ", K, "), got ", index.sizes());
  TORCH_CHECK_VALUE(z.dim() == 3 && z.size(0) == N && z.size(1) == K && z.size(2) == r,
                    "z must have shape (", N, ", ", K, ", ", r, "), got ", z.sizes());
  at::Tensor idx = index.to(at::kCPU).contiguous();
  if (N > 0) {
    TORCH_CHECK_VALUE(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < C,
                      "index must lie in [0, ", C, ")");
  }
  const auto opt = p.x.options();
  at::Tensor zz = z.to(p.x.scalar_type()).contiguous();
  Grads d;
  d.dx = at::empty({N, dx}, opt);     // every row written by slot 0
  d.dU = at::empty({C, dx, r}, opt);  // copied from dU^T below
  d.dV = at::zeros({C, r, dy}, opt);
  d.dmu_x = at::zeros({C, dx}, opt);
  d.dmu_y = at::zeros({C, dy}, opt);
  at::Tensor dWt = at::zeros({C, dx}, opt);  // dW_g^T: one contiguous row per condition
  d.db = at::zeros({C}, opt);
  at::Tensor dlogit = at::empty({N, K}, opt);  // dg first, then the logit gradient
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "tcfa_gated_stitch_routed_bwd", [&] {
    using T = scalar_t;
    constexpr int W = lanes<T>();
    const SlotGroups groups = group_by_condition(idx, C);
    const at::Tensor Vt =
        pad_cols(p.V.transpose(1, 2).contiguous(), W).contiguous();  // (C, dy, rp)
    const at::Tensor Ut =
        pad_cols(p.U.transpose(1, 2).contiguous(), W).contiguous();  // (C, r, dxp)
    at::Tensor dUt = at::zeros({C, r, dx}, opt), dzsum = at::zeros({C, r}, opt);
    at::Tensor dz_all = at::empty({N, K, Vt.size(2)}, opt);  // dz of every (row, slot)
    at::Tensor Wt = p.W.t().contiguous();
    const Routed<T> b(groups, N, K, dx, dy, r, ldo, Vt.size(2), Ut.size(2), p.x.data_ptr<T>(),
                      p.mu_y.data_ptr<T>(), g.data_ptr<T>(), zz.data_ptr<T>(), dout.data_ptr<T>(),
                      Vt.data_ptr<T>(), Ut.data_ptr<T>(), Wt.data_ptr<T>(), idx.data_ptr<int64_t>(),
                      dz_all.data_ptr<T>(), dlogit.data_ptr<T>(), d.dV.data_ptr<T>(),
                      d.dmu_y.data_ptr<T>(), dUt.data_ptr<T>(), dWt.data_ptr<T>(),
                      d.db.data_ptr<T>(), dzsum.data_ptr<T>(), d.dx.data_ptr<T>());
    for (int64_t s = 0; s < K; ++s) b.dz_and_dg(s);
    b.logit_grad(inv_tau);
    for (int64_t s = 0; s < K; ++s) b.param_grads(s);
    d.dU.copy_(dUt.transpose(1, 2));
    d.dU.sub_(p.mu_x.unsqueeze(2) * dzsum.unsqueeze(1));
    d.dmu_x.sub_(at::bmm(p.U, dzsum.unsqueeze(2)).squeeze(2));
    for (int64_t s = 0; s < K; ++s) b.input_grad(s);
  });
  d.dW = dWt.t().contiguous();
  return d;
}

}  // namespace
}  // namespace stitch

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_stitch_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                          const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                          const at::Tensor& U, const at::Tensor& V, const at::Tensor& mu_x,
                          const at::Tensor& mu_y, const at::Tensor& gates, const at::Tensor& index,
                          const at::Tensor& z, c10::optional<int64_t> top_k, double temperature) {
  using namespace stitch;
  Params p = prepare(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k, temperature);
  const int64_t N = p.N, dy = p.dy, K = p.K;
  const auto ct = p.x.scalar_type();
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == dy,
                    "grad_out must have shape (", N, ", ", dy, "), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(gates.dim() == 2 && gates.size(0) == N && gates.size(1) == K,
                    "gates must have shape (", N, ", ", K, "), got ", gates.sizes());
  // A gradient broadcast along rows (stride 0: what autograd passes for
  // out.sum() or out.mean()) is read as its one row by the routed kernels,
  // which address dout rows by pointer: materialising it wrote and re-read an
  // N x dy block, ~6% of the routed fwd+bwd of `tcfa bench stitch` (perf).
  const bool row_broadcast = !p.dense && N > 0 && grad_out.stride(0) == 0;
  at::Tensor dout = row_broadcast ? grad_out.detach().select(0, 0).to(ct).contiguous()
                                  : grad_out.detach().to(ct).contiguous();
  at::Tensor g = gates.to(ct).contiguous();
  const double inv_tau = 1.0 / temperature;
  const Grads d = p.dense ? dense_backward(p, dout, g, inv_tau)
                          : routed_backward(p, dout, row_broadcast ? 0 : dy, g, index, z, inv_tau);
  auto back = [](const at::Tensor& grad, const at::Tensor& like) {
    return grad.to(like.scalar_type());
  };
  return {back(d.dx, x), back(d.dW, gate_weight), back(d.db, gate_bias), back(d.dU, U),
          back(d.dV, V), back(d.dmu_x, mu_x),     back(d.dmu_y, mu_y)};
}

}  // namespace tcfa
