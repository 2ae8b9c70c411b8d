// C++ smoke test of the CMake build: the ops are registered and agree with a direct computation.
#include <torch/torch.h>

#include <iostream>

int main() {
  auto softmax_kl = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("rslad_fast::softmax_kl", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::string_view)>();
  auto pgd_step = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("rslad_fast::pgd_step_", "")
                      .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double, double)>();

  torch::manual_seed(0);
  at::Tensor s = torch::randn({16, 10}), t = torch::randn({16, 10});
  at::Tensor kl = softmax_kl.call(s, t, 1.0, "sum");
  at::Tensor expected = torch::kl_div(torch::log_softmax(s, 1), torch::log_softmax(t, 1), at::Reduction::Sum, true);
  const double kl_err = (kl - expected).abs().item<double>();

  at::Tensor x_nat = torch::rand({2, 3, 8, 8}), grad = torch::randn({2, 3, 8, 8});
  at::Tensor x_adv = x_nat.clone();
  pgd_step.call(x_adv, grad, x_nat, 8.0 / 255, 2.0 / 255, 0.0, 1.0);
  at::Tensor want = torch::clamp(
      torch::min(torch::max(x_nat + (2.0 / 255) * torch::sign(grad), x_nat - 8.0 / 255), x_nat + 8.0 / 255), 0.0, 1.0);
  const bool pgd_ok = torch::equal(x_adv, want);

  std::cout << "softmax_kl |err| = " << kl_err << ", pgd_step_ exact = " << pgd_ok << std::endl;
  return (kl_err < 1e-4 && pgd_ok) ? 0 : 1;
}
