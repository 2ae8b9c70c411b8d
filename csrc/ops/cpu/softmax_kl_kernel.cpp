// CPU kernels of softmax_kl and its backward: one task per block of rows, the row math from math.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../math.h"

namespace rslad_fast {
namespace {

// Rows per task: a [128, 10] batch is one task (threads would cost more than they save).
int64_t row_grain(int64_t classes) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(classes, 1));
}

// The row is folded into kLanes interleaved states merged as a tree at the end, like the CUDA kernel's
// 32 lanes: shorter sequential sums (more accurate for wide rows) and independent chains for the CPU.
constexpr int kLanes = 8;

template <typename scalar_t, typename acc_t>
math::KLState<acc_t> row_state(const scalar_t* s, const scalar_t* t, int64_t classes, acc_t inv_temp) {
  math::KLState<acc_t> st[kLanes];
  for (int k = 0; k < kLanes; ++k) st[k] = math::kl_init<acc_t>();
  for (int64_t c = 0; c < classes; ++c) {
    math::kl_update<acc_t>(st[c % kLanes], static_cast<acc_t>(t[c]) * inv_temp, static_cast<acc_t>(s[c]) * inv_temp);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) st[k] = math::kl_merge(st[k], st[k + width]);
  }
  return st[0];
}

// Sum of the per-class KL terms, with the same lane split.
template <typename scalar_t, typename acc_t>
acc_t row_kl_sum(const scalar_t* s, const scalar_t* t, int64_t classes, acc_t inv_temp, acc_t la, acc_t lb) {
  acc_t part[kLanes] = {};
  for (int64_t c = 0; c < classes; ++c) {
    part[c % kLanes] += math::kl_term<acc_t>(static_cast<acc_t>(t[c]) * inv_temp, static_cast<acc_t>(s[c]) * inv_temp, la, lb);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) part[k] += part[k + width];
  }
  return part[0];
}

at::Tensor softmax_kl_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                          c10::string_view reduction_name) {
  const int reduction = check_kl_args(student, teacher, temperature, reduction_name);
  const int64_t rows = student.size(0), classes = student.size(1);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  at::Tensor out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_temp = acc_t(1) / static_cast<acc_t>(temperature);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    if (reduction == math::kNone) {
      out = at::empty({rows}, s.options());
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          op[r] = static_cast<scalar_t>(
              math::kl_value(row_state<scalar_t, acc_t>(sp + r * classes, tp + r * classes, classes, inv_temp)));
        }
      });
      return;
    }
    // Per-task partial sums, added in task order, so the result does not depend on the thread count's
    // scheduling.
    const int64_t grain = row_grain(classes);
    const int64_t tasks = rows == 0 ? 0 : (rows + grain - 1) / grain;
    std::vector<acc_t> partial(tasks, acc_t(0));
    at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        acc_t acc = 0;
        for (int64_t r = task * grain, r_end = std::min(rows, (task + 1) * grain); r < r_end; ++r) {
          acc += math::kl_value(row_state<scalar_t, acc_t>(sp + r * classes, tp + r * classes, classes, inv_temp));
        }
        partial[task] = acc;
      }
    });
    acc_t total = 0;
    for (acc_t p : partial) total += p;
    total *= math::reduction_scale<acc_t>(reduction, rows, classes);
    out = at::scalar_tensor(static_cast<double>(total), s.options());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cpu(const at::Tensor& grad_output,
                                                           const at::Tensor& student, const at::Tensor& teacher,
                                                           double temperature, c10::string_view reduction_name) {
  const int reduction = check_kl_args(student, teacher, temperature, reduction_name);
  check_kl_grad_output(grad_output, student, reduction);
  const int64_t rows = student.size(0), classes = student.size(1);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  at::Tensor grad_s = at::empty_like(s, at::MemoryFormat::Contiguous);
  at::Tensor grad_t = at::empty_like(t, at::MemoryFormat::Contiguous);
  if (rows == 0) return {grad_s, grad_t};
  const at::Tensor go = grad_output.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_temp = acc_t(1) / static_cast<acc_t>(temperature);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* gsp = grad_s.data_ptr<scalar_t>();
    scalar_t* gtp = grad_t.data_ptr<scalar_t>();
    const acc_t reduced_scale = math::reduction_scale<acc_t>(reduction, rows, classes);
    at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* srow = sp + r * classes;
        const scalar_t* trow = tp + r * classes;
        const math::KLState<acc_t> st = row_state<scalar_t, acc_t>(srow, trow, classes, inv_temp);
        const acc_t la = math::lse_a(st), lb = math::lse_b(st);
        const acc_t kl = row_kl_sum<scalar_t, acc_t>(srow, trow, classes, inv_temp, la, lb);
        const acc_t g = static_cast<acc_t>(gop[reduction == math::kNone ? r : 0]) *
                        (reduction == math::kNone ? acc_t(1) : reduced_scale) * inv_temp;
        for (int64_t c = 0; c < classes; ++c) {
          acc_t gs, gt;
          math::kl_grad<acc_t>(static_cast<acc_t>(trow[c]) * inv_temp, static_cast<acc_t>(srow[c]) * inv_temp, la,
                               lb, kl, g, &gs, &gt);
          gsp[r * classes + c] = static_cast<scalar_t>(gs);
          gtp[r * classes + c] = static_cast<scalar_t>(gt);
        }
      }
    });
  });
  return {grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(rslad_fast, CPU, m) {
  m.impl("softmax_kl", &softmax_kl_cpu);
  m.impl("_softmax_kl_backward", &softmax_kl_backward_cpu);
}

}  // namespace rslad_fast
