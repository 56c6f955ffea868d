// Python module entry point: build and CPU information. Operators live in the other files.
#include "common.h"

#include <cstdlib>
#include <cstring>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace persona_kernels {

Isa cpu_isa() {
  Isa best = cpu_has_avx512() ? Isa::Avx512 : (cpu_has_avx2_fma() ? Isa::Avx2 : Isa::Portable);
  const char* cap = std::getenv("PERSONA_KERNELS_CPU_ISA");
  if (cap == nullptr) return best;
  Isa want = best;
  if (std::strcmp(cap, "portable") == 0) want = Isa::Portable;
  else if (std::strcmp(cap, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(cap, "avx512") == 0) want = Isa::Avx512;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

void* thread_scratch(ScratchSlot slot, size_t bytes) {
  struct Buffer {
    void* ptr = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(ptr); }
  };
  thread_local Buffer slots[static_cast<int>(ScratchSlot::Count)];
  Buffer& s = slots[static_cast<int>(slot)];
  if (s.size < bytes) {
    std::free(s.ptr);
    s.ptr = nullptr;
    s.size = 0;
    const size_t size = (bytes + 63) / 64 * 64;
    s.ptr = std::aligned_alloc(64, size);
    TORCH_CHECK(s.ptr != nullptr, "persona_kernels: could not allocate ", size, " bytes of scratch");
    s.size = size;
  }
  return s.ptr;
}

}  // namespace persona_kernels

namespace {

std::string isa_name() {
  switch (persona_kernels::cpu_isa()) {
    case persona_kernels::Isa::Avx512: return "avx512";
    case persona_kernels::Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

bool built_with_cuda() {
#ifdef PK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "persona_kernels compiled kernels (operators are registered under torch.ops.persona_kernels_C)";
  m.def("cpu_isa", &isa_name, "Instruction set the CPU kernels use on this machine: avx512, avx2 or portable");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
  m.def("openmp_threads", &openmp_threads, "OpenMP thread count seen by the extension");
  m.def("linear_stats_merge_cpu_", &persona_kernels::linear_stats_merge_cpu, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "The op torch.ops.persona_kernels_C.linear_stats_merge_cpu_ called directly, without the dispatcher (eager "
        "CPU calls with no autograd graph only): y = x @ weight.T + bias, with x's statistics merged into n, mean, "
        "m2 and nonfinite in place");
}
