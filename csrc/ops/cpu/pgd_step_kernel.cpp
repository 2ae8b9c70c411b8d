// CPU kernel of pgd_step_: one pass over memory, parallel over elements.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math.h"

namespace rslad_fast {
namespace {

template <typename scalar_t>
void pgd_step_loop(scalar_t* x_adv, const scalar_t* grad, const scalar_t* x_nat, int64_t n, double eps, double alpha,
                   double lo, double hi) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t e = eps, a = alpha, l = lo, h = hi;
  // 32K elements per task: large enough that thread start-up is amortised.
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      x_adv[i] = static_cast<scalar_t>(math::pgd_step<acc_t>(static_cast<acc_t>(x_adv[i]), static_cast<acc_t>(grad[i]),
                                                             static_cast<acc_t>(x_nat[i]), e, a, l, h));
    }
  });
}

void pgd_step_cpu(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, double eps, double alpha,
                  double lo, double hi) {
  check_pgd_args(x_adv, grad, x_nat, eps, alpha, lo, hi);
  TORCH_CHECK_VALUE(x_adv.device().is_cpu(), "rslad_fast: x_adv must be a CPU tensor for the CPU kernel");
  if (x_adv.numel() == 0) return;

  const PGDInputs in = dense_pgd_inputs(x_adv, grad, x_nat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x_adv.scalar_type(), "pgd_step_cpu", [&] {
    pgd_step_loop<scalar_t>(in.x_adv.data_ptr<scalar_t>(), in.grad.const_data_ptr<scalar_t>(),
                            in.x_nat.const_data_ptr<scalar_t>(), in.x_adv.numel(), eps, alpha, lo, hi);
  });
  if (!in.x_adv.is_same(x_adv)) x_adv.copy_(in.x_adv);
}

}  // namespace

TORCH_LIBRARY_IMPL(rslad_fast, CPU, m) { m.impl("pgd_step_", &pgd_step_cpu); }

}  // namespace rslad_fast
