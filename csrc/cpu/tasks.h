// Dynamically scheduled task loops over the rows of ragged batches.
#pragma once

#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace tcfa {

// A unit of work: rows [r0, r1) of problem k.
struct Task {
  int64_t k, r0, r1;
};

// Splits every (active) problem's rows into blocks of at most `block` rows.
inline std::vector<Task> row_tasks(const std::vector<int64_t>& off,
                                   const std::vector<uint8_t>& active, int64_t block) {
  std::vector<Task> tasks;
  for (size_t k = 0; k + 1 < off.size(); ++k) {
    if (!active[k]) continue;
    for (int64_t r = off[k]; r < off[k + 1]; r += block)
      tasks.push_back({static_cast<int64_t>(k), r, std::min(off[k + 1], r + block)});
  }
  return tasks;
}

// Splits every (active) problem's rows into at most `parts` contiguous chunks
// of at least `min_rows` rows each.
inline std::vector<Task> row_chunks(const std::vector<int64_t>& off,
                                    const std::vector<uint8_t>& active, int64_t parts,
                                    int64_t min_rows) {
  std::vector<Task> tasks;
  for (size_t k = 0; k + 1 < off.size(); ++k) {
    const int64_t n = off[k + 1] - off[k];
    if (!active[k] || n == 0) continue;
    const int64_t p = std::max<int64_t>(1, std::min(parts, n / std::max<int64_t>(min_rows, 1)));
    for (int64_t c = 0; c < p; ++c)
      tasks.push_back({static_cast<int64_t>(k), off[k] + n * c / p, off[k] + n * (c + 1) / p});
  }
  return tasks;
}

// Flushes denormal results and operands to zero while it lives (x86 MXCSR
// FTZ + DAZ), restoring the caller's mode after. Why: Sinkhorn terms
// exp((f + g - C)/eps) at small eps fall in the denormal band by the million,
// and each costs a microcode assist on Intel cores: with denormals the fused
// 4096^2 loop (`tcfa bench sinkhorn`, case A) ran ~8x slower at eps = 1. A
// denormal term weighs < 1e-38 (float) of a sum that the kernels keep O(1),
// so flushing it changes no result beyond rounding.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#endif
};

// Runs fn(task, task_index) over all tasks with dynamic scheduling: ragged
// problems make static chunking (what at::parallel_for does) unbalanced.
// kFlush = false keeps denormals (a kernel that rescales its input first).
template <bool kFlush = true, typename Fn>
inline void run_tasks(const std::vector<Task>& tasks, Fn fn) {
  const int64_t nt = static_cast<int64_t>(tasks.size());
  if (nt == 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), nt);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    const auto loop = [&] {
      for (int64_t w = b; w < e; ++w)
        for (int64_t t = next++; t < nt; t = next++) fn(tasks[t], t);
    };
    if constexpr (kFlush) {
      const FlushDenormals ftz;
      loop();
    } else {
      loop();
    }
  });
}

}  // namespace tcfa
