// CUDA kernels of softmax_kl and its backward. One warp per row: each lane folds a strided slice of the
// row into an online KL state (math.h), then the warp merges the 32 states with shuffles.
//
// Reduced losses ("sum", "batchmean", "mean") run as a single block of 32 warps that stride over the rows
// and add their row values in a fixed order: one launch, no atomics, deterministic, and no host sync, so
// the op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../math.h"
#include "cuda_utils.cuh"

namespace rslad_fast {
namespace {

constexpr int kWarpsPerBlock = 8;  // rows per block for per-row outputs
constexpr int kReduceWarps = 32;   // warps of the single block that computes a reduced loss
constexpr int kRowThreads = kWarpsPerBlock * cuda::kWarp;
constexpr int kReduceThreads = kReduceWarps * cuda::kWarp;
// Every kernel declares the block size it is launched with: without the bound, ptxas gave the double
// kl_reduce_kernel 66 registers per thread on sm_90 (45 on sm_80), and 66 x 1024 threads is over the 65,536
// registers of a block, so the launch failed with "too many resources requested". With the bound ptxas
// keeps it within 64 (tests/test_cuda_build.py checks registers x bound for every kernel and arch).

template <typename acc_t>
__device__ __forceinline__ math::KLState<acc_t> warp_merge(math::KLState<acc_t> st) {
  for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2) {
    math::KLState<acc_t> other;
    other.max_a = __shfl_down_sync(0xffffffffu, st.max_a, offset);
    other.sum_a = __shfl_down_sync(0xffffffffu, st.sum_a, offset);
    other.dot = __shfl_down_sync(0xffffffffu, st.dot, offset);
    other.max_b = __shfl_down_sync(0xffffffffu, st.max_b, offset);
    other.sum_b = __shfl_down_sync(0xffffffffu, st.sum_b, offset);
    st = math::kl_merge(st, other);
  }
  return st;
}

// The row's full state, valid in every lane (lane 0's merged state is broadcast).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ math::KLState<acc_t> row_state(const scalar_t* __restrict__ s,
                                                          const scalar_t* __restrict__ t, int64_t classes,
                                                          acc_t inv_temp, int lane) {
  math::KLState<acc_t> st = math::kl_init<acc_t>();
  for (int64_t c = lane; c < classes; c += cuda::kWarp) {
    math::kl_update<acc_t>(st, static_cast<acc_t>(t[c]) * inv_temp, static_cast<acc_t>(s[c]) * inv_temp);
  }
  st = warp_merge(st);
  st.max_a = __shfl_sync(0xffffffffu, st.max_a, 0);
  st.sum_a = __shfl_sync(0xffffffffu, st.sum_a, 0);
  st.dot = __shfl_sync(0xffffffffu, st.dot, 0);
  st.max_b = __shfl_sync(0xffffffffu, st.max_b, 0);
  st.sum_b = __shfl_sync(0xffffffffu, st.sum_b, 0);
  return st;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    kl_rows_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, scalar_t* __restrict__ out,
                   int64_t rows, int64_t classes, at::opmath_type<scalar_t> inv_temp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / cuda::kWarp;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / cuda::kWarp;
  for (int64_t r = warp; r < rows; r += warps) {
    const math::KLState<acc_t> st =
        row_state<scalar_t, acc_t>(s + r * classes, t + r * classes, classes, inv_temp, lane);
    if (lane == 0) out[r] = static_cast<scalar_t>(math::kl_value(st));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    kl_reduce_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, scalar_t* __restrict__ out,
                     int64_t rows, int64_t classes, at::opmath_type<scalar_t> inv_temp,
                     at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kReduceWarps];
  const int lane = threadIdx.x % cuda::kWarp;
  const int warp = threadIdx.x / cuda::kWarp;
  acc_t acc = 0;
  for (int64_t r = warp; r < rows; r += kReduceWarps) {
    const math::KLState<acc_t> st =
        row_state<scalar_t, acc_t>(s + r * classes, t + r * classes, classes, inv_temp, lane);
    acc += math::kl_value(st);
  }
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int w = 0; w < kReduceWarps; ++w) total += partial[w];
    out[0] = static_cast<scalar_t>(total * scale);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    kl_backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ s,
                       const scalar_t* __restrict__ t, scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_t,
                       int64_t rows, int64_t classes, at::opmath_type<scalar_t> inv_temp,
                       at::opmath_type<scalar_t> reduced_scale, bool per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / cuda::kWarp;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / cuda::kWarp;
  for (int64_t r = warp; r < rows; r += warps) {
    const scalar_t* srow = s + r * classes;
    const scalar_t* trow = t + r * classes;
    const math::KLState<acc_t> st = row_state<scalar_t, acc_t>(srow, trow, classes, inv_temp, lane);
    const acc_t la = math::lse_a(st), lb = math::lse_b(st);
    acc_t kl = 0;
    for (int64_t c = lane; c < classes; c += cuda::kWarp) {
      kl +=
          math::kl_term<acc_t>(static_cast<acc_t>(trow[c]) * inv_temp, static_cast<acc_t>(srow[c]) * inv_temp, la, lb);
    }
    for (int offset = cuda::kWarp / 2; offset > 0; offset /= 2) kl += __shfl_xor_sync(0xffffffffu, kl, offset);
    // grad_output is read on the device: no host sync, graph-capturable.
    const acc_t g = per_row ? static_cast<acc_t>(grad_output[r]) * inv_temp
                            : static_cast<acc_t>(grad_output[0]) * reduced_scale * inv_temp;
    for (int64_t c = lane; c < classes; c += cuda::kWarp) {
      acc_t gs, gt;
      math::kl_grad<acc_t>(static_cast<acc_t>(trow[c]) * inv_temp, static_cast<acc_t>(srow[c]) * inv_temp, la, lb, kl,
                           g, &gs, &gt);
      grad_s[r * classes + c] = static_cast<scalar_t>(gs);
      grad_t[r * classes + c] = static_cast<scalar_t>(gt);
    }
  }
}

int64_t row_blocks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(cuda::ceil_div(rows, kWarpsPerBlock), 65535));
}

at::Tensor softmax_kl_cuda(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                           c10::string_view reduction_name) {
  TORCH_CHECK_VALUE(student.is_cuda(), "rslad_fast: student_logits must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(student.device());
  const KLInputs in = kl_inputs(student, teacher, temperature, reduction_name);
  const int64_t rows = in.rows, classes = in.classes;
  const at::Tensor &s = in.s, &t = in.t;
  if (in.reduction == math::kNone) {
    at::Tensor out = at::empty({rows}, s.options());
    if (rows == 0) return out;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      kl_rows_kernel<scalar_t><<<row_blocks(rows), kRowThreads, 0, stream>>>(
          s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, classes,
          acc_t(1) / static_cast<acc_t>(temperature));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  at::Tensor out = at::empty({}, s.options());
  if (rows == 0) return out.zero_();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_reduce_kernel<scalar_t><<<1, kReduceThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, classes,
        acc_t(1) / static_cast<acc_t>(temperature), math::reduction_scale<acc_t>(in.reduction, rows, classes));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cuda(const at::Tensor& grad_output, const at::Tensor& student,
                                                            const at::Tensor& teacher, double temperature,
                                                            c10::string_view reduction_name) {
  TORCH_CHECK_VALUE(student.is_cuda(), "rslad_fast: student_logits must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(student.device());
  const KLBackwardInputs in = kl_backward_inputs(grad_output, student, teacher, temperature, reduction_name);
  const int64_t rows = in.rows, classes = in.classes;
  if (rows == 0) return {in.grad_s, in.grad_t};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.s.scalar_type(), "softmax_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_backward_kernel<scalar_t><<<row_blocks(rows), kRowThreads, 0, stream>>>(
        in.grad_output.const_data_ptr<scalar_t>(), in.s.const_data_ptr<scalar_t>(), in.t.const_data_ptr<scalar_t>(),
        in.grad_s.data_ptr<scalar_t>(), in.grad_t.data_ptr<scalar_t>(), rows, classes,
        acc_t(1) / static_cast<acc_t>(temperature), math::reduction_scale<acc_t>(in.reduction, rows, classes),
        in.reduction == math::kNone);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in.grad_s, in.grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(rslad_fast, CUDA, m) {
  m.impl("softmax_kl", &softmax_kl_cuda);
  m.impl("_softmax_kl_backward", &softmax_kl_backward_cuda);
}

}  // namespace rslad_fast
