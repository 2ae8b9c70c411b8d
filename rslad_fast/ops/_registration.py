"""Fake (meta) and autograd registrations of the compiled ops, so they work under torch.compile, with
FakeTensors and inside CUDA graphs (pytorch/extension-cpp's layout: schemas in C++, the rest here)."""

import torch


@torch.library.register_fake("rslad_fast::pgd_step_")
def _pgd_step_fake(x_adv, grad, x_nat, eps, alpha, lo=0.0, hi=1.0):
    return None


# Kernels registered from C++ for CPU and CUDA alone leave x_adv's version counter where it was, so a
# backward that saved x_adv would silently read the new values. The ADInplaceOrView kernel bumps it, as
# native in-place ops and torch.library.custom_op's mutable ops do, then hands over to the backend.
_lib = torch.library.Library("rslad_fast", "IMPL")
_pgd_step_op = torch.ops.rslad_fast.pgd_step_.default
_after_ad_inplace_or_view = torch._C._after_ADInplaceOrView_keyset


def _pgd_step_ad_inplace_or_view(keyset, x_adv, *args):
    torch.autograd.graph.increment_version(x_adv)
    return _pgd_step_op.redispatch(keyset & _after_ad_inplace_or_view, x_adv, *args)


_lib.impl("pgd_step_", _pgd_step_ad_inplace_or_view, "ADInplaceOrView", with_keyset=True)


@torch.library.register_fake("rslad_fast::softmax_kl")
def _softmax_kl_fake(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    if reduction == "none":
        return student_logits.new_empty(student_logits.shape[:1])
    return student_logits.new_empty(())


@torch.library.register_fake("rslad_fast::_softmax_kl_backward")
def _softmax_kl_backward_fake(grad_output, student_logits, teacher_logits, temperature, reduction):
    return (
        torch.empty_like(student_logits, memory_format=torch.contiguous_format),
        torch.empty_like(teacher_logits, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    student_logits, teacher_logits, temperature, reduction = inputs
    ctx.save_for_backward(student_logits, teacher_logits)
    ctx.temperature = temperature
    ctx.reduction = reduction


def _backward(ctx, grad_output):
    student_logits, teacher_logits = ctx.saved_tensors
    grad_s, grad_t = torch.ops.rslad_fast._softmax_kl_backward(
        grad_output, student_logits, teacher_logits, ctx.temperature, ctx.reduction
    )
    return (grad_s if ctx.needs_input_grad[0] else None, grad_t if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd("rslad_fast::softmax_kl", _backward, setup_context=_setup_context)
