// The op schemas, all in one block. Kernels register per backend in ops/cpu and ops/cuda; the fake
// (meta) and autograd registrations live in Python (rslad_fast/ops/_registration.py).
#include <torch/library.h>

#ifdef RSLAD_FAST_PYTHON_MODULE
#include <Python.h>

// `import rslad_fast._C` only has to load this shared library: the static initializers below register
// the ops with the dispatcher. No Python bindings are needed.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(rslad_fast, m) {
  // x_adv = clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), lo, hi), in place.
  // It returns nothing: torch.compile's functionalization rejects custom ops whose outputs alias an input
  // (Tensor(a!) returns), so the Python wrapper rslad_fast.ops.pgd_step_ returns x_adv instead.
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, float eps, float alpha, float lo=0.0, "
      "float hi=1.0) -> ()");
  // KL(softmax(teacher/T) || softmax(student/T)) over dim 1 of [B, C] logits.
  m.def(
      "softmax_kl(Tensor student_logits, Tensor teacher_logits, float temperature=1.0, "
      "str reduction=\"batchmean\") -> Tensor");
  // Gradients of softmax_kl for the student and the teacher logits.
  m.def(
      "_softmax_kl_backward(Tensor grad_output, Tensor student_logits, Tensor teacher_logits, "
      "float temperature, str reduction) -> (Tensor, Tensor)");
}
