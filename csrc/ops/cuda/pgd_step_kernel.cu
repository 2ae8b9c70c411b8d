// CUDA kernel of pgd_step_: one read of each input and one write, in place, on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math.h"
#include "cuda_utils.cuh"

namespace rslad_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pgd_step_kernel(scalar_t* __restrict__ x_adv, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x_nat,
                    int64_t n, at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> alpha,
                    at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)blockDim.x * gridDim.x) {
    x_adv[i] = static_cast<scalar_t>(math::pgd_step<acc_t>(static_cast<acc_t>(x_adv[i]), static_cast<acc_t>(grad[i]),
                                                           static_cast<acc_t>(x_nat[i]), eps, alpha, lo, hi));
  }
}

void pgd_step_cuda(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, double eps, double alpha,
                   double lo, double hi) {
  check_pgd_args(x_adv, grad, x_nat, eps, alpha, lo, hi);
  TORCH_CHECK_VALUE(x_adv.is_cuda(), "rslad_fast: x_adv must be a CUDA tensor for the CUDA kernel");
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());

  const PGDInputs in = dense_pgd_inputs(x_adv, grad, x_nat);
  const int64_t n = in.x_adv.numel();
  const int threads = kThreads;
  // Enough blocks to fill the GPU; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div(n, threads), 65535LL * 8);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x_adv.scalar_type(), "pgd_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pgd_step_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        in.x_adv.data_ptr<scalar_t>(), in.grad.const_data_ptr<scalar_t>(), in.x_nat.const_data_ptr<scalar_t>(), n,
        static_cast<acc_t>(eps), static_cast<acc_t>(alpha), static_cast<acc_t>(lo), static_cast<acc_t>(hi));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!in.x_adv.is_same(x_adv)) x_adv.copy_(in.x_adv);
}

}  // namespace

TORCH_LIBRARY_IMPL(rslad_fast, CUDA, m) { m.impl("pgd_step_", &pgd_step_cuda); }

}  // namespace rslad_fast
