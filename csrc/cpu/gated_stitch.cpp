// CPU kernels of tcfa::gated_stitch and tcfa::gated_stitch_backward. The math
// is stated once, in the docstring of tcfa.ops.gated_stitch:
//   logits = x W_g + b_g,  g = softmax(logits / tau) over all C (dense) or over
//   the top-k logits (routed),  out = sum_c g_c (mu_y[c] + (x - mu_x[c]) U_c V_c).
//
// Dense: three large GEMMs (gate, shrink x.[U_1..U_C], expand .[V_1;..;V_C])
// with the per-block gate scaling fused into one pass between them.
// Routed: slot s of every row (its s-th largest gate) is processed in one
// pass; the rows of a pass are grouped by their selected condition with a
// counting sort, and each condition gets one task doing a small GEMM pair
// (micro_kernel below) that reads its x rows in place by index and writes z
// and out rows directly. A row appears once per pass, so tasks write disjoint
// output rows (no atomics), and a condition is owned by one task per pass, so
// its parameter gradients need no reduction either. Unselected conditions are
// never touched. The shrink result z = (x - mu_x[c]) U_c of every selected
// (row, slot) is an output, kept by autograd so the backward skips that GEMM.
#include "common.h"
#include "kernels.h"

namespace tcfa {
namespace {

struct Params {
  at::Tensor x, W, b, U, V, mu_x, mu_y;  // compute dtype, contiguous
  int64_t N, dx, dy, C, r;
  bool dense;  // top_k = None: softmax over all C conditions
  int64_t K;   // conditions per row: C when dense, else top_k
};

int64_t checked_k(const c10::optional<int64_t>& top_k, int64_t C) {
  if (!top_k.has_value()) return C;
  TORCH_CHECK_VALUE(*top_k >= 1 && *top_k <= C, "top_k must lie in [1, ", C, "], got ",
                    *top_k);
  return *top_k;
}

// Bounds checks only; tcfa/_validate.py names every bad argument first.
Params prepare(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b,
               const at::Tensor& U, const at::Tensor& V, const at::Tensor& mu_x,
               const at::Tensor& mu_y, const c10::optional<int64_t>& top_k, double temperature) {
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "temperature must be > 0 and finite, got ", temperature);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, dx), got shape ", x.sizes());
  TORCH_CHECK_VALUE(U.dim() == 3, "U must be 3-D (C, dx, r), got shape ", U.sizes());
  const int64_t N = x.size(0), dx = x.size(1), C = U.size(0), r = U.size(2);
  TORCH_CHECK_VALUE(C >= 1, "U must hold at least one condition, got shape ", U.sizes());
  TORCH_CHECK_VALUE(U.size(1) == dx, "U must have shape (C, ", dx, ", r), got ", U.sizes());
  TORCH_CHECK_VALUE(V.dim() == 3 && V.size(0) == C && V.size(1) == r,
                    "V must have shape (", C, ", ", r, ", dy), got ", V.sizes());
  const int64_t dy = V.size(2);
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(0) == dx && W.size(1) == C,
                    "gate_weight must have shape (", dx, ", ", C, "), got ", W.sizes());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == C, "gate_bias must have shape (", C,
                    ",), got ", b.sizes());
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
  // Detached: the op is differentiated as a whole (tcfa/ops.py), and the
  // out= GEMMs below refuse inputs that require grad.
  auto cvt = [&](const at::Tensor& t) { return t.detach().to(ct).contiguous(); };
  return {cvt(x), cvt(W), cvt(b), cvt(U), cvt(V), cvt(mu_x), cvt(mu_y), N, dx, dy, C, r,
          !top_k.has_value(), checked_k(top_k, C)};
}

// [U_1 ... U_C] as one (dx, C*r) matrix and [V_1; ...; V_C] as (C*r, dy).
at::Tensor u_cat(const at::Tensor& U) {
  return U.permute({1, 0, 2}).reshape({U.size(1), U.size(0) * U.size(2)});
}

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

// Rows grouped by the condition selected in each slot: for slot s, the rows
// with index[n, s] == c are rows[s][start[s][c] .. start[s][c+1]).
struct SlotGroups {
  std::vector<std::vector<int64_t>> rows, start;
};

SlotGroups group_by_condition(const at::Tensor& index, int64_t C) {
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
std::vector<Task> condition_tasks(const SlotGroups& g, int64_t s) {
  std::vector<Task> tasks;
  const auto& st = g.start[s];
  for (int64_t c = 0; c + 1 < static_cast<int64_t>(st.size()); ++c)
    if (st[c + 1] > st[c]) tasks.push_back({c, st[c], st[c + 1]});
  return tasks;
}

// ---------------------------------------------------------------- micro-kernel
// acc[i][v] = sum_k a[i][k] * B[k, v*W .. v*W + W) for M rows given by
// pointer (rows of x read in place by index: no gathered copy) and NV vectors
// of B's columns (B already offset to the column block, row stride ldb, its
// columns padded to whole vectors). M x NV accumulators stay in registers.
// Replacing the gather + at::mm_out + scatter per condition with this kernel
// took the routed top-2 forward of the benchmark (N=8192, 768->768, C=64,
// r=32), single-threaded on the loaded shared machine, from 92 to 72 ms.
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
      // vector * scalar: one broadcast; splat()'s lane loop compiled to
      // masked per-lane inserts here and ran ~10x slower.
      const T ai = a[i][k];
      for (int v = 0; v < NV; ++v) acc[i][v] += b[v] * ai;
    }
  }
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
void rows_times(const T* const* a, int64_t n, int64_t kdim, const T* B, int64_t ldb,
                int64_t ncols, Epi&& epi) {
  constexpr int W = lanes<T>();
  if constexpr (M > 1) {  // the row tail, one smaller tile size per instantiation
    const int64_t full = n / M * M;
    if (n - full > 0)
      rows_times<T, (M > 4 ? 4 : 1), NV>(a + full, n - full, kdim, B, ldb, ncols,
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
inline void micro_kernel_rows(const T* const* a, int64_t kdim, const T* const* brow,
                              int64_t j, int64_t valid, vec_t<T> (&acc)[M][NV]) {
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
at::Tensor pad_cols(const at::Tensor& t, int64_t w) {
  const int64_t cols = t.size(2), padded = (cols + w - 1) / w * w;
  return padded == cols ? t : at::constant_pad_nd(t, {0, padded - cols});
}

// logits = x W_g + b_g with the micro-kernel, rows split across threads.
// MKL's sgemm takes its generic AVX2 path on this AMD machine
// (mkl_blas_def_sgemm_kernel_0_zen in perf, ymm only): swapping it for this
// kernel took the whole routed top-2 forward of the benchmark (N=8192,
// 768->768, C=64, r=32), single-threaded on the loaded shared machine, from
// 72 to 58 ms; the addmm alone took 26 ms there. On the Intel Xeon of a later
// session MKL runs its AVX-512 kernels, and the same addmm still took 6.9 ms
// against ~5 ms for this kernel plus the top-k. Dense mode keeps addmm: its
// gate GEMM is small next to the shrink and expand.
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
      rows_times<T, 6, 4>(xrow.data(), n1 - n0, dx, wp, cp, C,
                          [&](int64_t i, int64_t j, vec_t<T> v) {
        const int64_t valid = std::min<int64_t>(W, C - j);
        const vec_t<T> bias = valid == W ? load(bp + j) : load_partial<T>(bp + j, valid, T(0));
        store_valid<T>(lp + (n0 + i) * C + j, v + bias, valid);
      });
    });
  });
  return logits;
}

}  // namespace

// ------------------------------------------------------------------ forward
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_stitch_cpu(
    const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& gate_bias,
    const at::Tensor& U, const at::Tensor& V, const at::Tensor& mu_x, const at::Tensor& mu_y,
    c10::optional<int64_t> top_k, double temperature) {
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
      at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t c = 0; c < C; ++c) {
            T* blk = sp + (n * C + c) * r;
            const T g = gp[n * C + c];
            for (int64_t j = 0; j < r; ++j) blk[j] = g * (blk[j] - sh[c * r + j]);
          }
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
      run_tasks(condition_tasks(groups, s), [&](const Task& t, int64_t) {
        const int64_t c = t.k, n = t.r1 - t.r0;
        const int64_t* rows = groups.rows[s].data() + t.r0;
        std::vector<const T*> xrow(n);
        std::vector<T*> zrow(n);
        for (int64_t i = 0; i < n; ++i) {
          xrow[i] = xp + rows[i] * dx;
          zrow[i] = zp + (rows[i] * K + s) * r;
        }
        // z rows of the output, written in place (kept for the backward).
        const T* sh = shp + c * r;
        rows_times<T, 8, 2>(xrow.data(), n, dx, up + c * dx * rp, rp, r,
                            [&](int64_t i, int64_t j, vec_t<T> v) {
          const int64_t valid = std::min<int64_t>(W, r - j);
          store_valid<T>(zrow[i] + j,
                         v - (valid == W ? load(sh + j) : load_partial<T>(sh + j, valid, T(0))), valid);
        });
        // out[row] (+)= g (mu_y[c] + z V_c); slot 0 holds every row once, so
        // it initialises out and later slots add.
        const T* my = myp + c * dy;
        rows_times<T, 6, 4>(static_cast<const T* const*>(zrow.data()), n, r, vp + c * r * dyp, dyp, dy,
                            [&](int64_t i, int64_t j, vec_t<T> v) {
          const int64_t valid = std::min<int64_t>(W, dy - j);
          const T g = gp[rows[i] * K + s];
          T* o = op + rows[i] * dy + j;
          vec_t<T> y = (v + (valid == W ? load(my + j) : load_partial<T>(my + j, valid, T(0)))) * g;
          if (s > 0) y += valid == W ? load(o) : load_partial<T>(o, valid, T(0));
          store_valid<T>(o, y, valid);
        });
      });
    }
  });
  return {out.to(x.scalar_type()), gates, index, z};
}

// ------------------------------------------------------------------ backward
// With dout the gradient of out, for each selected (row, condition c) pair:
//   dS = dout V_c^T,  dg_c = dout.mu_y[c] + dS.z,  dz = g_c dS,
//   dV_c += (g_c z)^T dout,  dmu_y[c] += g_c dout,  dU_c += (x - mu_x[c])^T dz,
//   dx += dz U_c^T,  dmu_x[c] -= dz U_c^T,
// then the softmax over the selected logits: dlogit = g (dg - sum g dg) / tau
// (zero for unselected logits: the top-k choice is piecewise constant), and
//   dW_g = x^T dlogit,  db_g = sum_n dlogit,  dx += dlogit W_g^T.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_stitch_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                          const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                          const at::Tensor& U, const at::Tensor& V, const at::Tensor& mu_x,
                          const at::Tensor& mu_y, const at::Tensor& gates,
                          const at::Tensor& index, const at::Tensor& z,
                          c10::optional<int64_t> top_k, double temperature) {
  Params p = prepare(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k, temperature);
  const int64_t N = p.N, dx = p.dx, dy = p.dy, C = p.C, r = p.r, K = p.K;
  const bool dense = p.dense;
  const auto ct = p.x.scalar_type();
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == dy,
                    "grad_out must have shape (", N, ", ", dy, "), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(gates.dim() == 2 && gates.size(0) == N && gates.size(1) == K,
                    "gates must have shape (", N, ", ", K, "), got ", gates.sizes());
  // A gradient broadcast along rows (stride 0: what autograd passes for
  // out.sum() or out.mean()) is read as its one row by the routed kernels,
  // which address dout rows by pointer: materialising it wrote and re-read an
  // N x dy block, ~6% of the routed fwd+bwd of the benchmark (perf).
  const bool row_broadcast = !dense && N > 0 && grad_out.stride(0) == 0;
  at::Tensor dout = row_broadcast ? grad_out.detach().select(0, 0).to(ct).contiguous()
                                  : grad_out.detach().to(ct).contiguous();
  const int64_t ldo = row_broadcast ? 0 : dy;  // dout row stride
  at::Tensor g = gates.to(ct).contiguous();
  const double inv_tau = 1.0 / temperature;
  at::Tensor dx_out, dW, db, dU, dV, dmu_x, dmu_y;

  if (dense) {
    at::Tensor Ucat = u_cat(p.U).contiguous(), Vcat = p.V.reshape({C * r, dy});
    at::Tensor shift = at::bmm(p.mu_x.unsqueeze(1), p.U).reshape({C * r});
    // Recomputed rather than kept: the Triton kernel never writes this N x C*r
    // block, and both backends share one autograd formula.
    at::Tensor zs = at::mm(p.x, Ucat);    // z, then g z
    at::Tensor ds = at::mm(dout, Vcat.t());  // dS, then dz = g dS
    at::Tensor dg = at::mm(dout, p.mu_y.t()).contiguous();  // (N, C), then + dS.z
    AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_gated_stitch_dense_bwd", [&] {
      using T = scalar_t;
      T* zp = zs.data_ptr<T>();
      T* dsp = ds.data_ptr<T>();
      T* dgp = dg.data_ptr<T>();
      const T* gp = g.data_ptr<T>();
      const T* sh = shift.data_ptr<T>();
      at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t c = 0; c < C; ++c) {
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
          }
      });
    });
    dV = at::mm(zs.t(), dout).reshape({C, r, dy});
    dmu_y = at::mm(g.t(), dout);
    at::Tensor dz_sum = ds.sum(0).reshape({C, r});
    dU = at::mm(p.x.t(), ds).reshape({dx, C, r}).permute({1, 0, 2}).contiguous();
    dU.sub_(at::bmm(p.mu_x.unsqueeze(2), dz_sum.unsqueeze(1)));  // (x - mu_x)^T dz
    dmu_x = -at::bmm(p.U, dz_sum.unsqueeze(2)).squeeze(2);
    at::Tensor dlogit = g * (dg - (g * dg).sum(1, true)) * inv_tau;
    dx_out = at::mm(ds, Ucat.t());
    dx_out.addmm_(dlogit, p.W.t());
    dW = at::mm(p.x.t(), dlogit);
    db = dlogit.sum(0);
  } else {
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
    at::Tensor zz = z.to(ct).contiguous();
    const auto opt = p.x.options();
    dx_out = at::empty({N, dx}, opt);  // every row written by slot 0
    dU = at::empty({C, dx, r}, opt);   // copied from dU^T below
    dV = at::zeros({C, r, dy}, opt);
    dmu_x = at::zeros({C, dx}, opt);
    dmu_y = at::zeros({C, dy}, opt);
    at::Tensor dWt = at::zeros({C, dx}, opt);  // dW_g^T: one contiguous row per condition
    db = at::zeros({C}, opt);
    at::Tensor dlogit = at::empty({N, K}, opt);  // dg first, then the logit gradient
    AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_gated_stitch_routed_bwd", [&] {
      using T = scalar_t;
      const SlotGroups groups = group_by_condition(idx, C);
      const T* xp = p.x.data_ptr<T>();
      const T* myp = p.mu_y.data_ptr<T>();
      const T* gp = g.data_ptr<T>();
      const T* zp = zz.data_ptr<T>();
      const T* dop = dout.data_ptr<T>();
      T* dxp = dx_out.data_ptr<T>();
      T* dlp = dlogit.data_ptr<T>();
      T* dmyp = dmu_y.data_ptr<T>();
      // Every per-condition product runs on the micro-kernels, reading dout
      // and x rows in place by index (no gathered copies, no MKL):
      //   dS = dout V_c^T and dx += dz U_c^T by rows_times (B = V_c^T, U_c^T
      //   padded), dV_c (with dmu_y[c] as an extra row) and dU_c^T = dz^T x
      //   (with dW_g[:, c]^T = dlogit^T x as an extra row) by rows_times_rows,
      //   reducing over the condition's rows.
      // dU_c = x^T dz - mu_x[c] (sum dz) and dmu_x[c] = -U_c sum dz are
      // finished after the passes from the per-condition sums of dz.
      // With this (and pass B below) the backward op of the benchmark (N=8192,
      // 768->768, C=64, r=32, top-2) measured 37.7 ms (min of 15) against 17.8 ms
      // for the forward, on the shared loaded machine; with the gathers and MKL
      // GEMMs fwd+bwd was 67.8 ms against a 20.2 ms forward (quiet machine).
      constexpr int W = lanes<T>();
      const at::Tensor Vt = pad_cols(p.V.transpose(1, 2).contiguous(), W).contiguous();  // (C, dy, rp)
      const at::Tensor Ut = pad_cols(p.U.transpose(1, 2).contiguous(), W).contiguous();  // (C, r, dxp)
      const int64_t rp = Vt.size(2), dxp_ = Ut.size(2);
      const T* vtp = Vt.data_ptr<T>();
      const T* utp = Ut.data_ptr<T>();
      at::Tensor dUt = at::zeros({C, r, dx}, opt), dzsum = at::zeros({C, r}, opt);
      T* dutp = dUt.data_ptr<T>();
      T* dzsp = dzsum.data_ptr<T>();
      T* dvp = dV.data_ptr<T>();
      at::Tensor dz_all = at::empty({N, K, rp}, opt);  // dz of every (row, slot)
      T* dzap = dz_all.data_ptr<T>();
      // Pass A1: dz = g dS (kept in dz_all) and dg of every (row, slot).
      for (int64_t s = 0; s < K; ++s) {
        run_tasks(condition_tasks(groups, s), [&](const Task& t, int64_t) {
          const int64_t c = t.k, n = t.r1 - t.r0;
          const int64_t* rows = groups.rows[s].data() + t.r0;
          std::vector<const T*> drow(n);
          std::vector<T*> dsrow(n);
          for (int64_t i = 0; i < n; ++i) {
            drow[i] = dop + rows[i] * ldo;
            dsrow[i] = dzap + (rows[i] * K + s) * rp;
          }
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
      at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          T* dl = dlp + n * K;
          const T* gn = gp + n * K;
          T mean = 0;
          for (int64_t j = 0; j < K; ++j) mean += gn[j] * dl[j];
          for (int64_t j = 0; j < K; ++j) dl[j] = gn[j] * (dl[j] - mean) * T(inv_tau);
        }
      });
      // Pass A2: the parameter gradients. The logit gradient rides along as an
      // extra row of dz^T, so dW_g[:, c] = x^T dlogit comes out of the same
      // sweep over x rows as dU_c: the separate pass over x for the gate's
      // gradient read x twice more (K slots).
      T* dwp = dWt.data_ptr<T>();
      T* dbp = db.data_ptr<T>();
      for (int64_t s = 0; s < K; ++s) {
        run_tasks(condition_tasks(groups, s), [&](const Task& t, int64_t) {
          const int64_t c = t.k, n = t.r1 - t.r0;
          const int64_t* rows = groups.rows[s].data() + t.r0;
          std::vector<const T*> drow(n), xrow(n), arow(r + 1), dzrow(r + 1);
          // gzt: (r + 1, n) rows of (g z)^T then g; dzt: (r + 1, n) dz^T then dlogit.
          std::vector<T> gzt((r + 1) * n), dzt((r + 1) * n);
          for (int64_t i = 0; i < n; ++i) {
            drow[i] = dop + rows[i] * ldo;
            xrow[i] = xp + rows[i] * dx;
          }
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
          T* dvc = dvp + c * r * dy;
          T* dmy = dmyp + c * dy;
          rows_times_rows<T, 11, 2>(arow.data(), r + 1, n, drow.data(), dy,
                                    [&](int64_t i, int64_t j, vec_t<T> v) {
            const int64_t valid = std::min<int64_t>(W, dy - j);
            T* o = (i < r ? dvc + i * dy : dmy) + j;
            store_valid<T>(o, v + (valid == W ? load(o) : load_partial<T>(o, valid, T(0))), valid);
          });
          // dU_c^T += dz^T x and dW_g^T[c] += dlogit^T x.
          T* duc = dutp + c * r * dx;
          T* dwc = dwp + c * dx;
          rows_times_rows<T, 8, 3>(dzrow.data(), r + 1, n, xrow.data(), dx,
                                   [&](int64_t i, int64_t j, vec_t<T> v) {
            const int64_t valid = std::min<int64_t>(W, dx - j);
            T* o = (i < r ? duc + i * dx : dwc) + j;
            store_valid<T>(o, v + (valid == W ? load(o) : load_partial<T>(o, valid, T(0))), valid);
          });
        });
      }
      dU.copy_(dUt.transpose(1, 2));
      dU.sub_(p.mu_x.unsqueeze(2) * dzsum.unsqueeze(1));
      dmu_x.sub_(at::bmm(p.U, dzsum.unsqueeze(2)).squeeze(2));
      // Pass B: dx[row] = sum_s dz U_c^T + sum_s dlogit[row, s] W_g[:, c_s]^T.
      // The logit gradient has K nonzeros per row, so the gate GEMM shrinks to
      // K axpys per row, fused into slot 0's epilogue; slot 0 holds every row
      // once, so it writes dx (no zero fill) and later slots add: dx (N x dx)
      // is written once and read-modified K - 1 times instead of zero-filled,
      // updated K times and once more by the gate.
      at::Tensor Wt = p.W.t().contiguous();
      const T* wtp = Wt.data_ptr<T>();
      const int64_t* ip = idx.data_ptr<int64_t>();
      for (int64_t s = 0; s < K; ++s) {
        run_tasks(condition_tasks(groups, s), [&](const Task& t, int64_t) {
          const int64_t c = t.k, n = t.r1 - t.r0;
          const int64_t* rows = groups.rows[s].data() + t.r0;
          std::vector<const T*> dzr(n);
          for (int64_t i = 0; i < n; ++i) dzr[i] = dzap + (rows[i] * K + s) * rp;
          rows_times<T, 6, 4>(dzr.data(), n, r, utp + c * r * dxp_, dxp_, dx,
                              [&](int64_t i, int64_t j, vec_t<T> v) {
            const int64_t valid = std::min<int64_t>(W, dx - j), row = rows[i];
            T* o = dxp + row * dx + j;
            auto ld = [&](const T* q) { return valid == W ? load(q) : load_partial<T>(q, valid, T(0)); };
            if (s == 0) {
              for (int64_t q = 0; q < K; ++q) v += ld(wtp + ip[row * K + q] * dx + j) * dlp[row * K + q];
            } else {
              v += ld(o);
            }
            store_valid<T>(o, v, valid);
          });
        });
      }
    });
    dW = dWt.t().contiguous();
  }
  auto back = [](const at::Tensor& grad, const at::Tensor& like) {
    return grad.to(like.scalar_type());
  };
  return {back(dx_out, x),   back(dW, gate_weight), back(db, gate_bias), back(dU, U),
          back(dV, V),       back(dmu_x, mu_x),     back(dmu_y, mu_y)};
}


}  // namespace tcfa
