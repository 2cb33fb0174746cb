// CPU kernel of tcfa::segment_moments. The math is stated once, in
// tcfa/ops/__init__.py (segment_moments).
//
// Plan: a counting sort of the labels gives every segment's row indices
// (one O(N) sweep, no comparison sort); then per segment an fp64 mean, and
// the centered co-moment blocks as GEMMs of the mean-shifted rows. Shifting
// by the exact (fp64) segment mean before the fp32 GEMM is what keeps fp32
// inputs with a large common offset accurate: there is no E[x^2] - E[x]^2
// cancellation anywhere.
#include <array>

#include "checks.h"
#include "kernels.h"
#include "tasks.h"

namespace tcfa {
namespace {

// A segment is split into row chunks only when there are fewer segments than
// threads to keep busy; chunks below this size are not worth a partial GEMM.
constexpr int64_t kMinChunkRows = 256;
// Rows centered and multiplied per GEMM call: bounds the per-thread buffer
// (2048 x (dx + dy)) however large a segment is; 2048 keeps segments of
// ~1000 rows in one GEMM instead of a large and a sliver one.
constexpr int64_t kRowBlock = 2048;

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

// mean[s] = (1/n_s) sum_{i in s} rows[i], accumulated in double whatever T is,
// for the segments with skip[s] == 0.
template <typename T>
void segment_means(const T* rows, int64_t d, const SegmentIndex& idx,
                   const std::vector<uint8_t>& skip, double* mean) {
  const int64_t C = static_cast<int64_t>(idx.off.size()) - 1;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (skip[c]) continue;
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

// Row panels of this width: a Gram block c^T c is computed as its upper
// staircase (panel i times columns i.. d) and mirrored at the end: 37% / 42%
// fewer FLOPs for the 256 / 384 wide blocks of `tcfa bench cca`, whose
// moments ran ~1.3x faster with 64-row panels than with full GEMMs (and
// faster than with 128-row panels).
constexpr int64_t kGramPanel = 64;

// dst = beta * dst + c^T c on the panels on and above the diagonal only: the
// entries below them are left as they are (mirror_lower fills them).
void upper_gram(at::Tensor& dst, const at::Tensor& c, double beta) {
  const int64_t d = c.size(1);
  for (int64_t i0 = 0; i0 < d; i0 += kGramPanel) {
    const int64_t w = std::min(kGramPanel, d - i0);
    at::Tensor out = dst.narrow(0, i0, w).narrow(1, i0, d - i0);
    at::addmm_out(out, out, c.narrow(1, i0, w).t(), c.narrow(1, i0, d - i0), beta, 1.0);
  }
}

// s[c][j][i] = s[c][i][j] for i < j, every segment c, in 32 x 32 tiles: the
// plain loop wrote a column (stride d) per row and took 4% of the moments of
// `tcfa bench cca` (perf).
template <typename T> void mirror_lower(at::Tensor& s) {
  constexpr int64_t kTile = 32;
  const int64_t C = s.size(0), d = s.size(1);
  T* base = s.data_ptr<T>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* m = base + c * d * d;
      for (int64_t i0 = 0; i0 < d; i0 += kTile)
        for (int64_t j0 = i0; j0 < d; j0 += kTile)
          for (int64_t j = j0; j < std::min(d, j0 + kTile); ++j)
            for (int64_t i = i0; i < std::min({d, i0 + kTile, j}); ++i) m[j * d + i] = m[i * d + j];
    }
  });
}

// Rows perm[r0..r1) of `rows` minus `shift`, written to the (r1-r0, d) block `out`.
template <typename T>
void centered_block(const T* rows, int64_t d, const int64_t* perm, int64_t r0, int64_t r1,
                    const T* shift, T* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ row = rows + perm[r] * d;
    T* __restrict__ dst = out + (r - r0) * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = row[j] - shift[j];
  }
}

// The rows of a whole segment (perm[r0..r1)) copied to `out`, their fp64
// mean into `mean` and its rounding to T into `shift`, then subtracted in
// place: the segment is read from memory once, not once for the mean and
// again for the centring (two passes that took 17% of the moments of `tcfa
// bench cca`, perf; the buffer stays in cache between the three loops here).
template <typename T>
void gather_centered(const T* rows, int64_t d, const int64_t* perm, int64_t r0, int64_t r1,
                     double* mean, T* shift, T* out) {
  for (int64_t r = r0; r < r1; ++r)
    std::copy(rows + perm[r] * d, rows + perm[r] * d + d, out + (r - r0) * d);
  std::fill(mean, mean + d, 0.0);
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const T* __restrict__ row = out + r * d;
    for (int64_t j = 0; j < d; ++j) mean[j] += static_cast<double>(row[j]);
  }
  for (int64_t j = 0; j < d; ++j) {
    mean[j] /= static_cast<double>(r1 - r0);
    shift[j] = static_cast<T>(mean[j]);
  }
  for (int64_t r = 0; r < r1 - r0; ++r) {
    T* __restrict__ row = out + r * d;
    for (int64_t j = 0; j < d; ++j) row[j] -= shift[j];
  }
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
  at::Tensor mx = at::zeros({C, dx}, x.options().dtype(at::kDouble));
  at::Tensor my = at::zeros({C, dy}, x.options().dtype(at::kDouble));
  // An unselected block is returned empty, shape (C, 0, 0).
  auto block = [&](bool on, int64_t a, int64_t b) {
    return on ? at::empty({C, a, b}, opt) : at::empty({C, 0, 0}, opt);
  };
  at::Tensor sxx = block(xx, dx, dx), syy = block(yy, dy, dy), sxy = block(xy, dx, dy);
  at::Tensor shift_x, shift_y;

  AT_DISPATCH_FLOATING_TYPES(ct, "tcfa_segment_moments", [&] {
    using T = scalar_t;
    const T* xp = xs.data_ptr<T>();
    const T* yp = ys.data_ptr<T>();
    const bool need_x = xx || xy, need_y = yy || xy;
    int64_t nonempty = 0;
    for (int64_t c = 0; c < C; ++c) {
      const bool has_rows = idx.off[c + 1] > idx.off[c];
      nonempty += has_rows;
      if (!has_rows) {
        for (at::Tensor* s : {&sxx, &syy, &sxy})
          if (s->size(1) > 0) s->select(0, c).zero_();
      }
    }
    const int64_t threads = at::get_num_threads();
    const int64_t parts =
        std::max<int64_t>(1, (2 * threads + nonempty - 1) / std::max<int64_t>(nonempty, 1));
    const std::vector<uint8_t> all(C, 1);
    const auto tasks =
        (xx || yy || xy) ? row_chunks(idx.off, all, parts, kMinChunkRows) : std::vector<Task>{};
    // A segment held whole by one task, in one row block, gets its mean in
    // that task (gather_centered); the others first, here.
    std::vector<uint8_t> whole_x(C, 0), whole_y(C, 0);
    for (const Task& t : tasks)
      if (t.r0 == idx.off[t.k] && t.r1 == idx.off[t.k + 1] && t.r1 - t.r0 <= kRowBlock)
        whole_x[t.k] = need_x, whole_y[t.k] = need_y;
    segment_means(xp, dx, idx, whole_x, mx.data_ptr<double>());
    segment_means(yp, dy, idx, whole_y, my.data_ptr<double>());
    // Rows are shifted by the fp64 mean rounded to T, so centering is a plain
    // vectorised subtraction in T; the rounding residue delta = mean - shift
    // is removed exactly at the end.
    shift_x = mx.to(ct);  // the whole segments' entries are written by their tasks
    shift_y = my.to(ct);
    T* sxp = shift_x.data_ptr<T>();
    T* syp = shift_y.data_ptr<T>();
    double* mxp = mx.data_ptr<double>();
    double* myp = my.data_ptr<double>();
    if (!(xx || yy || xy)) return;

    // One centered-rows buffer per thread, reused across tasks: allocating it
    // per task page-faulted fresh memory every time.
    std::vector<std::vector<T>> xbuf(threads), ybuf(threads);
    // The first chunk of a segment writes its blocks in place; later chunks
    // (only when segments < threads) write partial sums, added afterwards.
    // Every chunk uses the same per-segment shift, so partials just add.
    std::vector<std::array<at::Tensor, 3>> partial(tasks.size());
    run_tasks(tasks, [&](const Task& t, int64_t ti) {
      const bool first = t.r0 == idx.off[t.k];
      const int64_t tid = at::get_thread_num();
      std::vector<T>& xb = xbuf[tid];
      std::vector<T>& yb = ybuf[tid];
      xb.resize(kRowBlock * dx);
      yb.resize(kRowBlock * dy);
      std::array<at::Tensor, 3> dst;
      at::Tensor* full[3] = {&sxx, &syy, &sxy};
      for (int b = 0; b < 3; ++b) {
        if (full[b]->size(1) == 0) continue;
        dst[b] =
            first ? full[b]->select(0, t.k) : at::zeros({full[b]->size(1), full[b]->size(2)}, opt);
      }
      for (int64_t r0 = t.r0; r0 < t.r1; r0 += kRowBlock) {
        const int64_t r1 = std::min(t.r1, r0 + kRowBlock), n = r1 - r0;
        const double beta = r0 == t.r0 ? 0.0 : 1.0;
        at::Tensor xc = at::from_blob(xb.data(), {n, dx}, opt);
        at::Tensor yc = at::from_blob(yb.data(), {n, dy}, opt);
        const int64_t* perm = idx.perm.data();
        if (whole_x[t.k])
          gather_centered(xp, dx, perm, r0, r1, mxp + t.k * dx, sxp + t.k * dx, xb.data());
        else if (need_x)
          centered_block(xp, dx, perm, r0, r1, sxp + t.k * dx, xb.data());
        if (whole_y[t.k])
          gather_centered(yp, dy, perm, r0, r1, myp + t.k * dy, syp + t.k * dy, yb.data());
        else if (need_y)
          centered_block(yp, dy, perm, r0, r1, syp + t.k * dy, yb.data());
        if (xx) upper_gram(dst[0], xc, beta);
        if (yy) upper_gram(dst[1], yc, beta);
        if (xy) at::addmm_out(dst[2], dst[2], xc.t(), yc, beta, 1.0);
      }
      if (!first) partial[ti] = dst;
    });
    for (size_t ti = 0; ti < tasks.size(); ++ti)
      for (int b = 0; b < 3; ++b)
        if (partial[ti][b].defined())
          (b == 0 ? sxx : b == 1 ? syy : sxy).select(0, tasks[ti].k).add_(partial[ti][b]);
    if (xx) mirror_lower<T>(sxx);
    if (yy) mirror_lower<T>(syy);
  });
  // sum (x - shift)(y - shift)^T = S + n delta_x delta_y^T, delta = mean - shift: a
  // rank-one term of the rounding residue (zero for fp64), removed here.
  if (ct != at::kDouble && (xx || yy || xy)) {
    // The term is ~1e-7 of S, so forming it in T costs nothing in accuracy;
    // in fp64 its (C, d, d) temporaries took longer than the centering.
    const at::Tensor n = count.to(at::kDouble).unsqueeze(1);
    const at::Tensor dx_ = mx - shift_x.to(at::kDouble), dy_ = my - shift_y.to(at::kDouble);
    const at::Tensor ndx = (n * dx_).to(ct).unsqueeze(2), ndy = (n * dy_).to(ct).unsqueeze(2);
    auto fix = [&](at::Tensor& s, const at::Tensor& na, const at::Tensor& b) {
      if (s.size(1) > 0) s.baddbmm_(na, b.to(ct).unsqueeze(1), 1.0, -1.0);
    };
    fix(sxx, ndx, dx_);
    fix(syy, ndy, dy_);
    fix(sxy, ndx, dy_);
  }
  return {count, mx.to(ct), my.to(ct), sxx, syy, sxy};
}

}  // namespace tcfa
