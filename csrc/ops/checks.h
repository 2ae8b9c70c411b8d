// Argument checks shared by every backend, so a bad call fails with a message naming the argument
// (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError), never a crash.
// rslad_fast/ops/_checks.py repeats them, word for word, for the pure-PyTorch fallback alone.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <string>

#include "math.h"

namespace rslad_fast {

// A dtype as Python spells it ("torch.float32", not the C++ "Float"): the messages read the same from
// either backend.
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), "rslad_fast: ", name,
                   " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
                   dtype_name(t.scalar_type()));
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "rslad_fast: ", name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "rslad_fast: ", name, " must have the dtype of ", ref_name,
                   " (", dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), "rslad_fast: ", name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

inline void check_pgd_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, double eps,
                           double alpha, double lo, double hi) {
  check_floating(x_adv, "x_adv");
  check_like(grad, x_adv, "grad", "x_adv");
  check_like(x_nat, x_adv, "x_nat", "x_adv");
  TORCH_CHECK_VALUE(eps >= 0.0, "rslad_fast: eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(alpha >= 0.0, "rslad_fast: alpha must be >= 0, got ", alpha);
  TORCH_CHECK_VALUE(lo <= hi, "rslad_fast: lo must be <= hi, got lo=", lo, " hi=", hi);
}

inline int parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return math::kNone;
  if (reduction == "sum") return math::kSum;
  if (reduction == "batchmean") return math::kBatchMean;
  if (reduction == "mean") return math::kMean;
  TORCH_CHECK_VALUE(false, "rslad_fast: reduction must be one of 'none', 'sum', 'batchmean', 'mean', got '",
                    std::string(reduction), "'");
  return -1;
}

// Returns the parsed reduction.
inline int check_kl_args(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                         c10::string_view reduction) {
  check_floating(student, "student_logits");
  TORCH_CHECK_VALUE(student.dim() == 2, "rslad_fast: student_logits must be 2-D [batch, classes], got ", student.dim(),
                    "-D with shape ", student.sizes());
  check_like(teacher, student, "teacher_logits", "student_logits");
  TORCH_CHECK_VALUE(student.size(1) >= 1, "rslad_fast: student_logits must have at least one class");
  TORCH_CHECK_VALUE(temperature > 0.0, "rslad_fast: temperature must be > 0, got ", temperature);
  return parse_reduction(reduction);
}

inline void check_kl_grad_output(const at::Tensor& grad_output, const at::Tensor& student, int reduction) {
  TORCH_CHECK_TYPE(grad_output.scalar_type() == student.scalar_type(),
                   "rslad_fast: grad_output must have the dtype of student_logits");
  TORCH_CHECK_VALUE(grad_output.device() == student.device(),
                    "rslad_fast: grad_output must be on the device of student_logits");
  if (reduction == math::kNone) {
    TORCH_CHECK_VALUE(grad_output.dim() == 1 && grad_output.size(0) == student.size(0),
                      "rslad_fast: grad_output must have shape [batch] for reduction='none', got ",
                      grad_output.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_output.numel() == 1, "rslad_fast: grad_output must be a scalar, got shape ",
                      grad_output.sizes());
  }
}

// ---- the tensors as the kernels of both backends read them: checked, and in dense memory

// softmax_kl's logits in row-major [rows, classes] (a strided view is copied once).
struct KLInputs {
  int reduction;
  int64_t rows, classes;
  at::Tensor s, t;  // student and teacher logits, contiguous
};

inline KLInputs kl_inputs(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                          c10::string_view reduction) {
  const int parsed = check_kl_args(student, teacher, temperature, reduction);
  return {parsed, student.size(0), student.size(1), student.contiguous(), teacher.contiguous()};
}

// The backward's: the logits, grad_output, and the gradients to fill, contiguous like the logits.
struct KLBackwardInputs : KLInputs {
  at::Tensor grad_output, grad_s, grad_t;
};

inline KLBackwardInputs kl_backward_inputs(const at::Tensor& grad_output, const at::Tensor& student,
                                           const at::Tensor& teacher, double temperature, c10::string_view reduction) {
  KLBackwardInputs in{kl_inputs(student, teacher, temperature, reduction)};
  check_kl_grad_output(grad_output, student, in.reduction);
  in.grad_output = grad_output.contiguous();
  in.grad_s = at::empty_like(in.s, at::MemoryFormat::Contiguous);
  in.grad_t = at::empty_like(in.t, at::MemoryFormat::Contiguous);
  return in;
}

inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && b.strides() == a.strides();
}

// pgd_step_'s three images in one dense layout: x_adv's own when it is dense (contiguous or channels_last),
// so that the usual calls copy nothing; plain contiguous copies otherwise. `x_adv` is x_adv itself or a
// copy, which the kernel then writes back.
struct PGDInputs {
  at::Tensor x_adv, grad, x_nat;
};

inline PGDInputs dense_pgd_inputs(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat) {
  const at::Tensor out = x_adv.is_non_overlapping_and_dense() ? x_adv : x_adv.contiguous();
  const at::Tensor g = same_dense_layout(out, grad) ? grad : grad.contiguous(out.suggest_memory_format());
  const at::Tensor nat = same_dense_layout(out, x_nat) ? x_nat : x_nat.contiguous(out.suggest_memory_format());
  if (!same_dense_layout(out, g) || !same_dense_layout(out, nat)) {
    // Layouts still differ (e.g. x_adv dense with unusual strides): fall back to plain contiguous.
    return {x_adv.contiguous(), grad.contiguous(), x_nat.contiguous()};
  }
  return {out, g, nat};
}

}  // namespace rslad_fast
