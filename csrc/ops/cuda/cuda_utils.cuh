// Only the c10 CUDA headers: ATen/cuda/CUDAContext.h pulls in cusparse.h, which the system toolkit here
// lacks, and nothing in these kernels needs it.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace rslad_fast {
namespace cuda {

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace rslad_fast
