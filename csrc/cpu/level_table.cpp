// The table this level library exports (see kernels.h). TCFA_CPU_LEVEL is
// set by setup.py together with the level's -march flags.
#include "kernels.h"

#ifndef TCFA_CPU_LEVEL
#error "TCFA_CPU_LEVEL must name the instruction-set level this library is built for"
#endif

extern "C" __attribute__((visibility("default"))) const tcfa::CpuKernels* tcfa_cpu_kernels() {
  static const tcfa::CpuKernels table{
      tcfa::kKernelTableVersion,
      TCFA_CPU_LEVEL,
      &tcfa::softmin_cpu,
      &tcfa::softmin_dense_cpu,
      &tcfa::sinkhorn_dense_cpu,
      &tcfa::cost_cpu,
      &tcfa::barycentric_cpu,
      &tcfa::gated_stitch_cpu,
      &tcfa::gated_stitch_backward_cpu,
      &tcfa::segment_moments_cpu,
      &tcfa::symmetric_top_eigh_cpu,
      &tcfa::gram_triu_cpu,
  };
  return &table;
}
