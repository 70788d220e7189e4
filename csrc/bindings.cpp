// One bindings file for both extensions: `_lspt_cpu` (C++ only) and `_lspt_cuda` (built with
// -DLSPT_WITH_CUDA, adds the CUDA kernels). The Python side (lspt_kernels/ops.py) validates the
// inputs; the kernels re-check the contract with TORCH_CHECK so a misuse never reads out of bounds.
#include <torch/extension.h>

#include "cpu/lspt_step_cpu.h"
#ifdef LSPT_WITH_CUDA
#include "cuda/lspt_step_cuda.h"
#endif

// The build ID (lspt_kernels/_build.py passes it as -D flags, from setup.py and from the JIT build):
// the loader refuses a prebuilt binary made from other sources or against another torch.
#define LSPT_STR_(x) #x
#define LSPT_STR(x) LSPT_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused LSPT step kernels (see lspt_kernels/ops.py for the contract)";
#ifdef LSPT_SOURCE_HASH
  m.attr("source_hash") = LSPT_STR(LSPT_SOURCE_HASH);
#endif
#ifdef LSPT_TORCH_TAG
  m.attr("torch_tag") = LSPT_STR(LSPT_TORCH_TAG);
#endif
  m.def("cpu_forward", &lspt::cpu_forward, "LSPT step forward (CPU)");
  m.def("cpu_backward", &lspt::cpu_backward, "LSPT step backward (CPU)");
#ifdef LSPT_WITH_CUDA
  m.def("cuda_forward", &lspt::cuda_forward, "LSPT step forward (CUDA)");
  m.def("cuda_backward", &lspt::cuda_backward, "LSPT step backward (CUDA)");
#endif
}
