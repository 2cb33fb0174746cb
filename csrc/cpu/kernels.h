// The CPU kernels one instruction-set level provides, as a table of function
// pointers. Every kernel source in csrc/cpu/ is compiled once per level
// (setup.py: avx512, avx2, default) into its own library, tcfa/_cpu_<level>;
// tcfa._C registers forwarders for the CPU dispatch key and points them at the
// table of the level chosen at run time (csrc/cpu_dispatch.cpp). Keeping the
// levels in separate libraries, loaded RTLD_LOCAL, means an inline function
// compiled for AVX-512 can never be merged into the baseline path by the
// linker (the one-definition-rule hazard of mixing -m flags in one library).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <tuple>

namespace tcfa {

using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

// Signatures follow the schemas in csrc/ops.cpp; each op's math is in tcfa/ops/__init__.py.
at::Tensor softmin_cpu(const Tensor& x, const Tensor& y, const Tensor& x_offsets,
                       const Tensor& y_offsets, const Tensor& h, const Tensor& log_b, double eps,
                       c10::string_view cost, const OptTensor& active);
at::Tensor softmin_dense_cpu(const Tensor& cost, const Tensor& x_offsets, const Tensor& y_offsets,
                             const Tensor& log_a, const Tensor& log_b, const Tensor& h, double eps,
                             int64_t dim, const OptTensor& active);
std::tuple<Tensor, Tensor, Tensor, Tensor> sinkhorn_dense_cpu(
    const Tensor& cost, const Tensor& x_offsets, const Tensor& y_offsets, const Tensor& log_a,
    const Tensor& log_b, const Tensor& f, const Tensor& g, double eps, int64_t max_iter, double tol,
    double tau_a, double tau_b, at::ArrayRef<double> schedule, double omega,
    const OptTensor& symmetric);
at::Tensor cost_cpu(const Tensor& x, const Tensor& y, const Tensor& x_offsets,
                    const Tensor& y_offsets, c10::string_view cost);
at::Tensor barycentric_cpu(const Tensor& x, const Tensor& y, const Tensor& x_offsets,
                           const Tensor& y_offsets, const Tensor& g, const Tensor& log_b,
                           const Tensor& values, double eps, c10::string_view cost);
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_stitch_cpu(
    const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias, const Tensor& U,
    const Tensor& V, const Tensor& mu_x, const Tensor& mu_y, c10::optional<int64_t> top_k,
    double temperature);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_stitch_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias,
    const Tensor& U, const Tensor& V, const Tensor& mu_x, const Tensor& mu_y, const Tensor& gates,
    const Tensor& index, const Tensor& z, c10::optional<int64_t> top_k, double temperature);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> segment_moments_cpu(
    const Tensor& x, const Tensor& y, const Tensor& labels, int64_t num_segments, bool xx, bool yy,
    bool xy);
std::tuple<Tensor, Tensor, Tensor> symmetric_top_eigh_cpu(const Tensor& A, int64_t k);
at::Tensor gram_triu_cpu(at::TensorList xs, bool centre);

// Changed whenever the table or a signature above changes, so that tcfa._C
// refuses a level library left over from an older build instead of calling
// through a mismatched pointer.
constexpr int64_t kKernelTableVersion = 5;

struct CpuKernels {
  int64_t version;
  const char* level;  // "avx512", "avx2", "default" or "native"
  decltype(&softmin_cpu) softmin;
  decltype(&softmin_dense_cpu) softmin_dense;
  decltype(&sinkhorn_dense_cpu) sinkhorn_dense;
  decltype(&cost_cpu) cost;
  decltype(&barycentric_cpu) barycentric;
  decltype(&gated_stitch_cpu) gated_stitch;
  decltype(&gated_stitch_backward_cpu) gated_stitch_backward;
  decltype(&segment_moments_cpu) segment_moments;
  decltype(&symmetric_top_eigh_cpu) symmetric_top_eigh;
  decltype(&gram_triu_cpu) gram_triu;
};

}  // namespace tcfa

// Each level library exports this one symbol (C linkage: found by dlsym).
extern "C" const tcfa::CpuKernels* tcfa_cpu_kernels();
