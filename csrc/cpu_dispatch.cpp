// CPU dispatch by instruction-set level, the way ATen picks its CPU
// capability: the CPU's features are read once, the best compiled level is
// loaded, and TCFA_CPU_CAPABILITY may force a lower one. The CPU kernels are
// registered here as forwarders that call through the active level's table
// (csrc/cpu/kernels.h), so a test or benchmark can switch levels in one
// process (tcfa.ops.set_cpu_capability).
#include <Python.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>

#include "cpu/kernels.h"

namespace tcfa {
namespace {

std::atomic<const CpuKernels*> active_kernels{nullptr};

const CpuKernels& active() {
  const CpuKernels* k = active_kernels.load(std::memory_order_acquire);
  TORCH_CHECK(k != nullptr,
              "tcfa's CPU kernels are not loaded: import tcfa (it loads the level "
              "chosen by tcfa.ops.cpu_capability()) before calling torch.ops.tcfa on CPU tensors");
  return *k;
}

// Forwarder<&CpuKernels::op>::call has the op's own signature, so that
// m.impl infers the same schema as the kernel it forwards to.
template <typename Fn, Fn CpuKernels::* Member>
struct Forwarder;
template <typename R, typename... Args, R (*CpuKernels::*Member)(Args...)>
struct Forwarder<R (*)(Args...), Member> {
  static R call(Args... args) { return (active().*Member)(std::forward<Args>(args)...); }
};
#define TCFA_FORWARD(op) &Forwarder<decltype(CpuKernels::op), &CpuKernels::op>::call

TORCH_LIBRARY_IMPL(tcfa, CPU, m) {
  m.impl("softmin", TCFA_FORWARD(softmin));
  m.impl("softmin_dense", TCFA_FORWARD(softmin_dense));
  m.impl("sinkhorn_dense", TCFA_FORWARD(sinkhorn_dense));
  m.impl("cost", TCFA_FORWARD(cost));
  m.impl("barycentric", TCFA_FORWARD(barycentric));
  m.impl("gated_stitch", TCFA_FORWARD(gated_stitch));
  m.impl("gated_stitch_backward", TCFA_FORWARD(gated_stitch_backward));
  m.impl("segment_moments", TCFA_FORWARD(segment_moments));
  m.impl("symmetric_top_eigh", TCFA_FORWARD(symmetric_top_eigh));
  m.impl("gram_triu", TCFA_FORWARD(gram_triu));
}

// The best level this CPU and OS can run. GCC's x86-64-vN checks include the
// OS support for the wider registers (XGETBV), not only the CPUID bits.
const char* best_level() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "default";
}

PyObject* py_best_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(best_level());
}

// use_cpu_kernels(path): loads (once) the level library at `path` and makes its
// table the active one; returns the level's name. Libraries stay loaded, so
// switching back is a pointer swap.
PyObject* py_use_cpu_kernels(PyObject*, PyObject* arg) {
  const char* path = PyUnicode_AsUTF8(arg);
  if (path == nullptr) return nullptr;
  static std::mutex lock;
  static std::map<std::string, const CpuKernels*> loaded;
  std::lock_guard<std::mutex> guard(lock);
  const CpuKernels* table = nullptr;
  if (auto it = loaded.find(path); it != loaded.end()) {
    table = it->second;
  } else {
    // RTLD_LOCAL: the level's symbols (inline functions compiled for its ISA)
    // must never resolve another library's references.
    void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      PyErr_Format(PyExc_ImportError, "cannot load tcfa CPU kernels %s: %s", path, dlerror());
      return nullptr;
    }
    auto get = reinterpret_cast<decltype(&tcfa_cpu_kernels)>(dlsym(handle, "tcfa_cpu_kernels"));
    if (get == nullptr || get()->version != kKernelTableVersion) {
      PyErr_Format(PyExc_ImportError,
                   "%s is not a tcfa CPU kernel library of this build (table version %lld "
                   "expected): rebuild the extension",
                   path, static_cast<long long>(kKernelTableVersion));
      return nullptr;
    }
    table = get();
    loaded.emplace(path, table);
  }
  active_kernels.store(table, std::memory_order_release);
  return PyUnicode_FromString(table->level);
}

PyMethodDef methods[] = {
    {"best_cpu_capability", py_best_cpu_capability, METH_NOARGS,
     "The best instruction-set level this CPU runs: 'avx512', 'avx2' or 'default'."},
    {"use_cpu_kernels", py_use_cpu_kernels, METH_O,
     "Load the CPU kernel library at the given path and make it the active level."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* dispatch_methods() { return methods; }

}  // namespace tcfa
