// CPU kernel of tcfa::segment_moments. The math is stated once, in
// tcfa/ops.py (segment_moments).
//
// Plan: a counting sort of the labels gives every segment's row indices
// (one O(N) sweep, no comparison sort); then per segment an fp64 mean, and
// the centered co-moment blocks as GEMMs of the mean-shifted rows. Shifting
// by the exact (fp64) segment mean before the fp32 GEMM is what keeps fp32
// inputs with a large common offset accurate: there is no E[x^2] - E[x]^2
// cancellation anywhere.
#include <array>

#include "common.h"

namespace tcfa {
namespace {

// A segment is split into row chunks only when there are fewer segments than
// threads to keep busy; chunks below this size are not worth a partial GEMM.
constexpr int64_t kMinChunkRows = 256;

// Rows of segment s are perm[off[s]], ..., perm[off[s+1]-1], in input order.
struct SegmentIndex {
  std::vector<int64_t> off, perm;
};

SegmentIndex counting_sort(const at::Tensor& labels, int64_t C) {
  auto lab = labels.to(at::kCPU).contiguous();
  const int64_t* l = lab.data_ptr<int64_t>();
  const int64_t n = lab.numel();
  SegmentIndex s;
  s.off.assign(C + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(l[i] >= 0 && l[i] < C, "labels must lie in [0, ", C, "), got ", l[i],
                      " at row ", i);
    ++s.off[l[i] + 1];
  }
  for (int64_t c = 0; c < C; ++c) s.off[c + 1] += s.off[c];
  std::vector<int64_t> cursor(s.off.begin(), s.off.end() - 1);
  s.perm.resize(n);
  for (int64_t i = 0; i < n; ++i) s.perm[cursor[l[i]]++] = i;
  return s;
}

// mean[s] = (1/n_s) sum_{i in s} rows[i], accumulated in double whatever T is.
template <typename T>
void segment_means(const T* rows, int64_t d, const SegmentIndex& idx, double* mean) {
  const int64_t C = static_cast<int64_t>(idx.off.size()) - 1;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* m = mean + c * d;
      std::fill(m, m + d, 0.0);
      const int64_t n = idx.off[c + 1] - idx.off[c];
      if (n == 0) continue;
      for (int64_t r = idx.off[c]; r < idx.off[c + 1]; ++r) {
        const T* row = rows + idx.perm[r] * d;
        for (int64_t j = 0; j < d; ++j) m[j] += static_cast<double>(row[j]);
      }
      for (int64_t j = 0; j < d; ++j) m[j] /= static_cast<double>(n);
    }
  });
}

// Rows perm[r0..r1) of `rows`, minus their segment mean, as an (r1-r0, d) block.
template <typename T>
at::Tensor centered_block(const T* rows, int64_t d, const int64_t* perm, int64_t r0,
                          int64_t r1, const double* mean, const at::TensorOptions& opt) {
  at::Tensor out = at::empty({r1 - r0, d}, opt);
  T* o = out.data_ptr<T>();
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = rows + perm[r] * d;
    T* dst = o + (r - r0) * d;
    for (int64_t j = 0; j < d; ++j)
      dst[j] = static_cast<T>(static_cast<double>(row[j]) - mean[j]);
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
segment_moments_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels,
                    int64_t num_segments, bool xx, bool yy, bool xy) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, dx), got shape ", x.sizes());
  TORCH_CHECK_VALUE(y.dim() == 2, "y must be 2-D (N, dy), got shape ", y.sizes());
  TORCH_CHECK_VALUE(y.size(0) == x.size(0), "x and y must have the same number of rows, got ",
                    x.size(0), " and ", y.size(0));
  check_same_dtype(y, x.scalar_type(), "y");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a floating tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
                   labels.scalar_type());
  check_rows(labels, x.size(0), "labels");
  TORCH_CHECK_VALUE(num_segments >= 1, "num_segments must be >= 1, got ", num_segments);

  const int64_t C = num_segments, dx = x.size(1), dy = y.size(1);
  const auto ct = compute_dtype(x.scalar_type());
  const auto opt = x.options().dtype(ct);
  const at::Tensor xs = x.to(ct).contiguous(), ys = y.to(ct).contiguous();
  const SegmentIndex idx = counting_sort(labels, C);

  at::Tensor count = at::empty({C}, x.options().dtype(at::kLong));
  for (int64_t c = 0; c < C; ++c) count.data_ptr<int64_t>()[c] = idx.off[c + 1] - idx.off[c];
  at::Tensor mx = at::empty({C, dx}, x.options().dtype(at::kDouble));
  at::Tensor my = at::empty({C, dy}, x.options().dtype(at::kDouble));
  // An unselected block is returned empty, shape (C, 0, 0).
  auto block = [&](bool on, int64_t a, int64_t b) {
    return on ? at::zeros({C, a, b}, opt) : at::empty({C, 0, 0}, opt);
  };
  at::Tensor sxx = block(xx, dx, dx), syy = block(yy, dy, dy), sxy = block(xy, dx, dy);

  AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_segment_moments", [&] {
    using T = scalar_t;
    const T* xp = xs.data_ptr<T>();
    const T* yp = ys.data_ptr<T>();
    const double* mxp = mx.data_ptr<double>();
    const double* myp = my.data_ptr<double>();
    segment_means(xp, dx, idx, mx.data_ptr<double>());
    segment_means(yp, dy, idx, my.data_ptr<double>());
    if (!(xx || yy || xy)) return;

    int64_t nonempty = 0;
    for (int64_t c = 0; c < C; ++c) nonempty += idx.off[c + 1] > idx.off[c];
    const int64_t threads = at::get_num_threads();
    const int64_t parts = std::max<int64_t>(1, (2 * threads + nonempty - 1) / std::max<int64_t>(nonempty, 1));
    const std::vector<uint8_t> all(C, 1);
    const auto tasks = row_chunks(idx.off, all, parts, kMinChunkRows);
    // The first chunk of a segment writes its blocks in place; later chunks
    // (only when segments < threads) write partial sums, added afterwards.
    // Every chunk is centered on the full segment's mean, so partials add
    // without a Chan correction.
    std::vector<std::array<at::Tensor, 3>> partial(tasks.size());
    run_tasks(tasks, [&](const Task& t, int64_t ti) {
      const bool first = t.r0 == idx.off[t.k];
      at::Tensor xc = (xx || xy) ? centered_block(xp, dx, idx.perm.data(), t.r0, t.r1, mxp + t.k * dx, opt)
                                 : at::Tensor();
      at::Tensor yc = (yy || xy) ? centered_block(yp, dy, idx.perm.data(), t.r0, t.r1, myp + t.k * dy, opt)
                                 : at::Tensor();
      auto gemm = [&](at::Tensor& out, int slot, const at::Tensor& a, const at::Tensor& b) {
        if (first) {
          at::Tensor dst = out.select(0, t.k);
          at::mm_out(dst, a.t(), b);
        } else {
          partial[ti][slot] = at::mm(a.t(), b);
        }
      };
      if (xx) gemm(sxx, 0, xc, xc);
      if (yy) gemm(syy, 1, yc, yc);
      if (xy) gemm(sxy, 2, xc, yc);
    });
    for (size_t ti = 0; ti < tasks.size(); ++ti) {
      const int64_t k = tasks[ti].k;
      if (partial[ti][0].defined()) sxx.select(0, k).add_(partial[ti][0]);
      if (partial[ti][1].defined()) syy.select(0, k).add_(partial[ti][1]);
      if (partial[ti][2].defined()) sxy.select(0, k).add_(partial[ti][2]);
    }
  });
  return {count, mx.to(ct), my.to(ct), sxx, syy, sxy};
}

TORCH_LIBRARY_IMPL(tcfa, CPU, m) { m.impl("segment_moments", &segment_moments_cpu); }

}  // namespace tcfa
