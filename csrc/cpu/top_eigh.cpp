// CPU kernel of tcfa::symmetric_top_eigh. The math is stated once, in
// tcfa/ops/__init__.py (symmetric_top_eigh).
//
// LAPACK's syevd (torch.linalg.eigh) computes all n eigenvectors by divide
// and conquer; CCA needs the k largest only. Per matrix, one task:
//   1. Householder reduction to tridiagonal form, T = Q^T A Q;
//   2. the k largest eigenvalues of T by bisection on Sturm counts, all k
//      at once, one per vector lane;
//   3. their eigenvectors by inverse iteration on T, re-orthogonalised
//      within clusters of close eigenvalues (the method of LAPACK's stein);
//   4. Q applied to those k vectors only;
//   5. a check against the input: residuals |A z - lambda z| and
//      orthogonality |Z^T Z - I| within a small multiple of n eps. A matrix
//      that fails is flagged; the caller recomputes it with eigh.
// The matrix is scaled by 1 / max |a_ij| first, so neither the squared
// off-diagonals of the Sturm recurrence nor the inverse iteration's growth
// can overflow whatever the input's scale.
#include <numeric>

#include "kernels.h"
#include "tasks.h"
#include "vec.h"

namespace tcfa {
namespace {

// y[0..m) += s * x[0..m)
template <typename T> inline void axpy(T* __restrict__ y, T s, const T* __restrict__ x, int64_t m) {
  constexpr int W = lanes<T>();
  const vec_t<T> sv = splat<T>(s);
  int64_t j = 0;
  for (; j + W <= m; j += W) store(y + j, load(y + j) + sv * load(x + j));
  for (; j < m; ++j) y[j] += s * x[j];
}

template <typename T> inline double dot(const T* a, const T* b, int64_t m) {
  double s = 0;
  for (int64_t j = 0; j < m; ++j) s += static_cast<double>(a[j]) * b[j];
  return s;
}

// Reflector j from row j of a (its entries right of the diagonal = column j
// below it): (I - t v v^T) x = beta e_1 with beta = -sign(x_0) |x| (LAPACK's
// larfg); v (v_0 = 1) overwrites x. Sets d[j], e[j], tau[j] and returns t.
template <typename T> T reflector(T* a, int64_t n, int64_t ld, int64_t j, T* d, T* e, T* tau) {
  T* x = a + j * ld + j + 1;
  const int64_t m = n - j - 1;
  double tail = 0;
  for (int64_t i = 1; i < m; ++i) tail += static_cast<double>(x[i]) * x[i];
  d[j] = a[j * ld + j];
  e[j] = x[0];
  tau[j] = 0;
  x[0] = 1;
  if (tail == 0) return 0;  // already tridiagonal here: H_j = I
  const double x0 = e[j], norm = std::sqrt(x0 * x0 + tail), beta = x0 >= 0 ? -norm : norm;
  const T scale = static_cast<T>(1.0 / (x0 - beta));
  for (int64_t i = 1; i < m; ++i) x[i] *= scale;
  e[j] = static_cast<T>(beta);
  return tau[j] = static_cast<T>((beta - x0) / beta);
}

// Householder reduction of the symmetric n x n matrix a (row-major, leading
// dimension ld, a multiple of the vector width, rows 64-byte aligned, columns
// n.. ld zero), overwritten: d (n) and e (n - 1) are T's diagonal and
// off-diagonal. Reflector j < n - 2 is H_j = I - tau_j v v^T on coordinates
// j+1 .. n-1, v kept in row j; T = H_{n-3} ... H_0 A H_0 ... H_{n-3}.
// Step j: A22 -= v w^T + w v^T on A22 = a[j+1.., j+1..], w = p - (t/2)(p.v) v,
// p = t A22 v. Each step is one pass over the trailing rows: row j+1 is
// updated first, which gives reflector j+1, then every later row is updated
// and dotted with that reflector (the next p) in the same loop. The loops run
// over whole aligned vectors from the vector holding column j+1: v, w and
// the next v are zero outside their columns, so the columns left of j+1
// (never read again) and the zero padding only ever get 0 added. Separate
// passes with scalar tails on unaligned rows ran ~2.5x slower at n = 256 (dx
// of `tcfa bench cca`).
template <typename T>
void tridiagonalise(T* a, int64_t n, int64_t ld, T* d, T* e, T* tau, T* v, T* w, T* v_next,
                    T* p_next) {
  constexpr int W = lanes<T>();
  auto spread = [&](int64_t j, T* dst) {  // reflector j (row j) as a zero-padded ld vector
    std::fill(dst, dst + ld, T(0));
    std::copy(a + j * ld + j + 1, a + j * ld + n, dst + j + 1);
  };
  if (n >= 3) {
    T t = reflector(a, n, ld, 0, d, e, tau);
    spread(0, v);
    std::fill(w, w + ld, T(0));
    if (t != 0)
      for (int64_t i = 1; i < n; ++i) w[i] = t * dot_row<T>(a + i * ld, v, ld);
    for (int64_t j = 0; j + 2 < n; ++j) {
      const int64_t c0 = (j + 1) / W * W;
      if (t != 0) {
        const T half = static_cast<T>(0.5 * t * dot(w + j + 1, v + j + 1, n - j - 1));
        for (int64_t c = j + 1; c < n; ++c) w[c] -= half * v[c];  // p becomes w
        T* row = a + (j + 1) * ld;
        const vec_t<T> vi = splat<T>(-v[j + 1]), wi = splat<T>(-w[j + 1]);
        for (int64_t c = c0; c < ld; c += W)
          store(row + c, load(row + c) + vi * load(w + c) + wi * load(v + c));
      }
      const T t_next = j + 3 < n ? reflector(a, n, ld, j + 1, d, e, tau) : T(0);
      if (t_next != 0) spread(j + 1, v_next);
      std::fill(p_next, p_next + ld, T(0));
      for (int64_t i = j + 2; i < n; ++i) {
        T* row = a + i * ld;
        const vec_t<T> vi = splat<T>(-v[i]), wi = splat<T>(-w[i]);
        vec_t<T> acc = splat<T>(T(0));
        for (int64_t c = c0; c < ld; c += W) {
          vec_t<T> r = load(row + c);
          if (t != 0) r += vi * load(w + c) + wi * load(v + c), store(row + c, r);
          if (t_next != 0) acc += r * load(v_next + c);
        }
        if (t_next != 0) p_next[i] = t_next * hsum<T>(acc);
      }
      std::swap(v, v_next);
      std::swap(w, p_next);
      t = t_next;
    }
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * ld + n - 2];
    e[n - 2] = a[(n - 2) * ld + n - 1];
  }
  d[n - 1] = a[(n - 1) * ld + n - 1];
}

// The k largest eigenvalues of T (descending) by bisection: lane l of a vector
// searches eigenvalue number n-1-j (ascending), j = its index, keeping
// count(lo) <= n-1-j < count(hi), count(s) = #eigenvalues < s (Sturm). Every
// lane halves its interval per step, so a fixed number of steps reaches the
// working precision for all of them.
template <typename T>
void top_eigenvalues(const T* d, const T* e, int64_t n, int64_t k, T* lam, std::vector<T>& e2) {
  constexpr int W = lanes<T>();
  using V = vec_t<T>;
  T glo = d[0], ghi = d[0], emax = 0;
  e2.assign(n, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T r = (i > 0 ? std::abs(e[i - 1]) : T(0)) + (i + 1 < n ? std::abs(e[i]) : T(0));
    glo = std::min(glo, d[i] - r);
    ghi = std::max(ghi, d[i] + r);
    if (i + 1 < n) e2[i] = e[i] * e[i], emax = std::max(emax, e2[i]);
  }
  const T eps = std::numeric_limits<T>::epsilon();
  const T pivmin = std::numeric_limits<T>::min() * std::max(T(1), emax);
  const T span = std::max(ghi - glo, std::max(std::abs(ghi), std::abs(glo)) * eps) + pivmin;
  glo -= span * eps * 4 + pivmin;
  ghi += span * eps * 4 + pivmin;
  const T tol = 2 * eps * std::max(std::abs(glo), std::abs(ghi)) + pivmin;
  const int steps = static_cast<int>(std::ceil(std::log2((ghi - glo) / tol))) + 1;
  for (int64_t j0 = 0; j0 < k; j0 += W) {
    V lo = splat<T>(glo), hi = splat<T>(ghi), target;
    for (int l = 0; l < W; ++l) target[l] = static_cast<T>(n - 1 - std::min(j0 + l, k - 1));
    for (int s = 0; s < steps; ++s) {
      const V mid = (lo + hi) * T(0.5);
      // q_i = (d_i - s) - e_{i-1}^2 / q_{i-1}, |q_i| < pivmin replaced by -pivmin (LAPACK's stebz)
      const V lo_piv = splat<T>(-pivmin), hi_piv = splat<T>(pivmin), one = splat<T>(T(1)),
              zero = splat<T>(T(0));
      V q = splat<T>(d[0]) - mid, count = zero;
      for (int64_t i = 0;;) {
        q = (q > lo_piv && q < hi_piv) ? lo_piv : q;
        count += q < zero ? one : zero;
        if (++i == n) break;
        q = (splat<T>(d[i]) - mid) - splat<T>(e2[i - 1]) / q;
      }
      const auto above = count > target;  // eigenvalue n-1-j lies below mid
      hi = above ? mid : hi;
      lo = above ? lo : mid;
    }
    for (int l = 0; l < W && j0 + l < k; ++l) lam[j0 + l] = (lo[l] + hi[l]) * T(0.5);
  }
}

// (T - s I) = P L U by Gaussian elimination with partial pivoting (rows i,
// i+1 swapped when the subdiagonal is larger); solve() then overwrites y with
// (T - s I)^-1 y. A zero pivot is replaced by `tiny`: s is an eigenvalue, so
// U is nearly singular, which is what makes inverse iteration converge.
template <typename T> struct ShiftedLU {
  std::vector<T> u0, u1, u2, mult;
  std::vector<uint8_t> swap;

  void factor(const T* d, const T* e, int64_t n, T s, T tiny) {
    u0.assign(n, 0), u1.assign(n, 0), u2.assign(n, 0), mult.assign(n, 0), swap.assign(n, 0);
    T a = d[0] - s, b = n > 1 ? e[0] : T(0);  // current row: a at column i, b at column i+1
    for (int64_t i = 0; i + 1 < n; ++i) {
      const T c = e[i], dn = d[i + 1] - s, en = i + 2 < n ? e[i + 1] : T(0);
      if (std::abs(a) >= std::abs(c)) {
        const T piv = a != 0 ? a : tiny;
        u0[i] = piv, u1[i] = b, u2[i] = 0, mult[i] = c / piv;
        a = dn - mult[i] * b, b = en;
      } else {
        u0[i] = c, u1[i] = dn, u2[i] = en, mult[i] = a / c, swap[i] = 1;
        a = b - mult[i] * dn, b = -mult[i] * en;
      }
    }
    u0[n - 1] = a != 0 ? a : tiny;
  }

  void solve(T* y, int64_t n) const {
    for (int64_t i = 0; i + 1 < n; ++i) {
      if (swap[i]) std::swap(y[i], y[i + 1]);
      y[i + 1] -= mult[i] * y[i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      T r = y[i];
      if (i + 1 < n) r -= u1[i] * y[i + 1];
      if (i + 2 < n) r -= u2[i] * y[i + 2];
      y[i] = r / u0[i];
    }
  }
};

template <typename T> inline void normalise(T* x, int64_t n) {
  const double nrm = std::sqrt(dot(x, x, n));
  const T inv = nrm > 0 ? static_cast<T>(1.0 / nrm) : T(0);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

// Eigenvectors of T for the descending eigenvalues lam, as the columns of the
// row-major n x k matrix z. Eigenvalues closer than 1e-3 |T| to the previous
// one continue its cluster, and each iterate is orthogonalised against the
// cluster's earlier vectors (modified Gram-Schmidt); shifts closer than
// 10 eps |T| are pulled apart so that no two solves are the same.
template <typename T>
void tridiagonal_vectors(const T* d, const T* e, int64_t n, const T* lam, int64_t k, T tnorm,
                         T* z) {
  constexpr int kIterations = 3;
  const T eps = std::numeric_limits<T>::epsilon();
  const T cluster_gap = T(1e-3) * tnorm, min_sep = 10 * eps * tnorm;
  const T tiny = eps * tnorm + std::numeric_limits<T>::min();
  std::vector<T> cols(k * n), x(n);  // column-major copy of the vectors while they are built
  ShiftedLU<T> lu;
  int64_t first = 0;  // first vector of the current cluster
  T shift = 0;
  for (int64_t j = 0; j < k; ++j) {
    T s = lam[j];
    if (j > 0) {
      if (lam[j - 1] - lam[j] > cluster_gap) first = j;
      s = std::min(s, shift - min_sep);
    }
    shift = s;
    lu.factor(d, e, n, s, tiny);
    uint64_t seed = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(j + 1);
    for (int64_t i = 0; i < n; ++i) {  // a fixed pseudo-random start in (-1, 1)
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      x[i] = static_cast<T>(static_cast<double>(seed >> 11) * 0x1.0p-52 - 1.0);
    }
    normalise(x.data(), n);
    for (int it = 0; it < kIterations; ++it) {
      lu.solve(x.data(), n);
      for (int64_t q = first; q < j; ++q) {
        const T* c = cols.data() + q * n;
        axpy(x.data(), -dot_row<T>(x.data(), c, n), c, n);
      }
      normalise(x.data(), n);
    }
    std::copy(x.begin(), x.end(), cols.begin() + j * n);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j) z[i * k + j] = cols[j * n + i];
}

// z <- Q z for the n x k row-major z, Q = H_0 ... H_{n-3} (reflectors in the
// rows of a, leading dimension ld).
template <typename T>
void apply_reflectors(const T* a, int64_t ld, const T* tau, int64_t n, int64_t k, T* z, T* w) {
  for (int64_t j = n - 3; j >= 0; --j) {
    if (tau[j] == 0) continue;
    const T* v = a + j * ld + j + 1;  // v_0 = 1 is stored
    const int64_t m = n - j - 1;
    T* zr = z + (j + 1) * k;
    std::fill(w, w + k, T(0));
    for (int64_t i = 0; i < m; ++i) axpy(w, v[i], zr + i * k, k);  // w = v^T z
    for (int64_t i = 0; i < m; ++i) axpy(zr + i * k, -tau[j] * v[i], w, k);
  }
}

// Rayleigh quotients of the columns of z into lam; true when every residual
// |A z_j - lam_j z_j| is within 16 sqrt(n) eps |T| (|T|_inf >= |A|_2 up to
// rounding) and every |z_i.z_j - delta_ij| within 16 sqrt(n) eps.
template <typename T>
bool check_and_refine(const T* a, int64_t n, int64_t k, const T* z, T tnorm, T* lam) {
  const double eps = std::numeric_limits<T>::epsilon(), tol = 16 * std::sqrt(double(n)) * eps;
  const double tol_r = tol * tnorm;
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor A = at::from_blob(const_cast<T*>(a), {n, n}, opt);
  const at::Tensor Z = at::from_blob(const_cast<T*>(z), {n, k}, opt);
  const at::Tensor az_t = at::mm(A, Z), zz_t = at::mm(Z.t(), Z);  // one thread inside a task
  const T* az = az_t.data_ptr<T>();
  const T* zz = zz_t.data_ptr<T>();
  bool ok = true;
  for (int64_t j = 0; j < k; ++j) {
    double rq = 0;
    for (int64_t i = 0; i < n; ++i) rq += double(az[i * k + j]) * z[i * k + j];
    lam[j] = static_cast<T>(rq);
    double r2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double r = double(az[i * k + j]) - rq * z[i * k + j];
      r2 += r * r;
    }
    ok = ok && std::sqrt(r2) <= tol_r;
    for (int64_t q = 0; q <= j; ++q) ok = ok && std::abs(double(zz[q * k + j]) - (q == j)) <= tol;
  }
  return ok;  // NaN anywhere fails the comparisons
}

// n values of T starting on a 64-byte boundary, zero-filled.
template <typename T> struct AlignedBuffer {
  std::vector<T> storage;
  T* data;
  explicit AlignedBuffer(int64_t n) : storage(n + 64 / sizeof(T)) {
    const auto u = reinterpret_cast<uintptr_t>(storage.data());
    data = reinterpret_cast<T*>((u + 63) / 64 * 64);
  }
};

template <typename T>
bool top_eigh_one(const T* src, int64_t n, int64_t k, T* lam, T* z) {
  constexpr int W = lanes<T>();
  T amax = 0;
  for (int64_t i = 0; i < n * n; ++i) amax = std::max(amax, std::abs(src[i]));
  if (!(amax > 0) || !std::isfinite(amax)) {  // zero matrix: e_1..e_k, eigenvalues 0
    std::fill(z, z + n * k, T(0));
    for (int64_t j = 0; j < k; ++j) z[j * k + j] = 1, lam[j] = 0;
    return amax == 0;
  }
  const T inv = T(1) / amax;
  const int64_t ld = (n + W - 1) / W * W;
  AlignedBuffer<T> a(n * ld), v(ld), w(ld), v2(ld), w2(ld);
  std::vector<T> orig(n * n), d(n), e(std::max<int64_t>(n - 1, 1)), tau(n, T(0)), e2;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) orig[i * n + j] = a.data[i * ld + j] = src[i * n + j] * inv;
  tridiagonalise(a.data, n, ld, d.data(), e.data(), tau.data(), v.data, w.data, v2.data, w2.data);
  T tnorm = 0;
  for (int64_t i = 0; i < n; ++i)
    tnorm = std::max(tnorm, std::abs(d[i]) + (i > 0 ? std::abs(e[i - 1]) : T(0)) +
                                (i + 1 < n ? std::abs(e[i]) : T(0)));
  top_eigenvalues(d.data(), e.data(), n, k, lam, e2);
  tridiagonal_vectors(d.data(), e.data(), n, lam, k, tnorm, z);
  std::vector<T> scratch(k);
  apply_reflectors(a.data, ld, tau.data(), n, k, z, scratch.data());
  // checked against the scaled copy: squared residuals of the raw input overflow near 1e154 (fp64)
  const bool ok = check_and_refine(orig.data(), n, k, z, tnorm, lam);
  // Rayleigh quotients of a repeated eigenvalue differ by rounding in either
  // direction: sort the pairs so that values stay descending.
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t i, int64_t j) { return lam[i] > lam[j]; });
  std::vector<T> lam_sorted(k), row(k);
  for (int64_t j = 0; j < k; ++j) lam_sorted[j] = lam[order[j]] * amax;
  std::copy(lam_sorted.begin(), lam_sorted.end(), lam);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) row[j] = z[i * k + order[j]];
    std::copy(row.begin(), row.end(), z + i * k);
  }
  return ok;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_top_eigh_cpu(const at::Tensor& A,
                                                                      int64_t k) {
  TORCH_CHECK_VALUE(A.dim() == 3 && A.size(1) == A.size(2),
                    "A must be a batch of square matrices (B, n, n), got shape ", A.sizes());
  const int64_t B = A.size(0), n = A.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "k must lie in [1, n = ", n, "], got ", k);
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                   "A must be float32 or float64, got ", A.scalar_type());
  const at::Tensor a = A.contiguous();
  at::Tensor values = at::empty({B, k}, a.options());
  at::Tensor vectors = at::empty({B, n, k}, a.options());
  at::Tensor ok = at::empty({B}, a.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tcfa_symmetric_top_eigh", [&] {
    using T = scalar_t;
    const T* ap = a.data_ptr<T>();
    T* lp = values.data_ptr<T>();
    T* zp = vectors.data_ptr<T>();
    bool* okp = ok.data_ptr<bool>();
    std::vector<Task> tasks;
    for (int64_t b = 0; b < B; ++b) tasks.push_back({b, 0, 0});
    // No denormal flush here: the input is scaled to max |a_ij| = 1 inside the
    // task, and a tiny input must keep its values through that scaling.
    run_tasks<false>(tasks, [&](const Task& t, int64_t) {
      okp[t.k] = top_eigh_one(ap + t.k * n * n, n, k, lp + t.k * k, zp + t.k * n * k);
    });
  });
  return {values, vectors, ok};
}

}  // namespace tcfa
