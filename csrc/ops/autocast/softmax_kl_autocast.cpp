// Autocast kernels of softmax_kl, as torchvision's csrc/ops/autocast/ ones are written: under torch.autocast,
// float16 and bfloat16 logits are cast to float32 and the op runs again with autocast excluded, so a
// student's low-precision logits and a float32 target mix without casts at the call site. The result is
// float32, as that of torch's own float32-policy ops (log_softmax, kl_div, cross_entropy); torchvision casts
// back to the input dtype, but every caller here goes on in float32. float32 and float64 tensors, and
// tensors of another device type, pass unchanged: outside autocast nothing of this file runs at all.
//
// The backward needs no kernel here: it receives the float32 tensors the forward saved, and the cast's own
// backward hands float16/bfloat16 gradients to the caller's logits.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace rslad_fast {
namespace {

// DispatchKey::Autocast is CUDA's autocast key; AutocastCPU is the CPU's.
template <c10::DispatchKey kAutocastKey, c10::DeviceType kDeviceType>
at::Tensor softmax_kl_autocast(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                               c10::string_view reduction) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rslad_fast::softmax_kl", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::string_view)>();
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  return op.call(at::autocast::cached_cast(at::kFloat, student, kDeviceType),
                 at::autocast::cached_cast(at::kFloat, teacher, kDeviceType), temperature, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(rslad_fast, Autocast, m) {
  m.impl("softmax_kl", &softmax_kl_autocast<c10::DispatchKey::Autocast, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(rslad_fast, AutocastCPU, m) {
  m.impl("softmax_kl", &softmax_kl_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

}  // namespace rslad_fast
