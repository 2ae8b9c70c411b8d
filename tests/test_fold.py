"""BatchNorm folding (rslad_fast.models.fold): the folded eval-mode copy computes what the model computes in
eval mode, up to float rounding, and follows the model's training through refresh().

Tolerances, per dtype (relative L2 error over the batch):
- fp32 (TF32 off on CUDA): logits within 1e-5 of the unfolded eval-mode pass (seen: <= 3e-7 on the CPU),
  the input gradient within 2e-4: a pre-activation within rounding of 0 can flip its ReLU mask, which moves
  the gradient of that one position (seen: 4e-7 typically, 5e-5 for ResNet-18 at one of three seeds, where
  no gradient value moved by 1e-3 of the largest). A wrong fold errs by O(1).
- bf16 autocast: bf16 itself moves the input gradient by 1-15% from fp32 (seen on the CPU: 0.7-14%), so the
  folded bf16 pass is held to the unfolded bf16 pass's own distance from the fp32 reference (at most twice
  it, plus a small floor), and its logits within 2e-2 of the unfolded bf16 logits (seen: <= 5e-3).
- x' after RSLAD's 10-step attack: at most 5% of its values differ (see test_pgd_x_adv_matches).

Every test runs on the CPU, and again on CUDA under the `cuda` mark (skipped where no GPU is visible).
"""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from rslad_fast import fused_kl_pgd
from rslad_fast.attacks.pgd import model_mode
from rslad_fast.engine.precision import tf32
from rslad_fast.models import build
from rslad_fast.models.fold import FoldedCopy, find_conv_bn_pairs, fold_bn, fold_report
from rslad_fast.models.wideresnet import WideResNet
from rslad_fast.models.wrn_dm import DMWideResNet

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Every architecture of models.ARCHS at test size: the two WideResNets as smaller networks of the same class
# (depth 10 = one block per stage, width 2), which have the same foldable pattern as WRN-34-10 / WRN-70-16.
ARCHS = {
    "tiny": lambda: build("tiny"),
    "resnet8": lambda: build("resnet8"),
    "resnet18": lambda: build("resnet18"),
    "mnv2": lambda: build("mnv2"),
    "wrn10-2": lambda: WideResNet(depth=10, widen_factor=2),
    "dmwrn10-2": lambda: DMWideResNet(depth=10, width=2),
}


@pytest.fixture(autouse=True)
def _strict_fp32():
    with tf32(False):  # torch's default lets cuDNN convolutions round fp32 to TF32 on CUDA
        yield


def _randomize_bn(model, seed=0):
    """BatchNorms with non-trivial affine parameters and running statistics (fresh ones are the identity
    map up to eps, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _model(arch, device, channels_last=False, seed=0):
    torch.manual_seed(seed)
    model = _randomize_bn(ARCHS[arch](), seed).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _input(batch, device, channels_last=False, seed=1):
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _forward_and_grad(model, x, amp_dtype=None):
    """Logits (float32) and the input gradient of a fixed random linear function of them."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        logits = model(x)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(x.device)
    (grad,) = torch.autograd.grad((logits.float() * w).sum(), x)
    return logits.detach().float(), grad


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tensors(model):
    return list(model.parameters()) + list(model.buffers())


# ---- what folds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, folded, total",
    [
        ("tiny", 2, 2),
        ("resnet8", 9, 9),
        ("resnet18", 20, 20),
        ("mnv2", 57, 57),
        # pre-activation: each block's bn2 (after conv1) and the first block's bn1 (reads the stem conv only)
        ("wrn10-2", 4, 9),
        ("dmwrn10-2", 4, 7),
    ],
)
def test_fold_counts(arch, folded, total):
    assert fold_report(ARCHS[arch]()) == {"folded": folded, "total": total}


def test_fold_counts_of_the_teachers():
    # WRN-34-10 itself: 15 blocks' bn2 + block1's first bn1 fold; 15 other bn1, the final bn1 and the 10 BNs
    # of the unused sub_block1 stay. WRN-70-16 by a width-2 network of the same depth (the full one is 1 GB).
    assert fold_report(build("wrn34-10")) == {"folded": 16, "total": 41}
    assert fold_report(DMWideResNet(depth=70, width=2)) == {"folded": 34, "total": 67}


def test_pairs_are_conv_then_bn_of_the_same_block():
    pairs = find_conv_bn_pairs(build("resnet18"))
    assert ("conv1", "bn1") in pairs and ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in pairs
    pairs = dict(find_conv_bn_pairs(WideResNet(depth=10, widen_factor=2)))
    assert pairs["conv1"] == "block1.layer.0.bn1"  # the stem's output feeds nothing but this BN
    assert pairs["block2.layer.0.conv1"] == "block2.layer.0.bn2"
    assert "block2.layer.0.bn1" not in pairs.values()  # reads a residual sum


def test_stem_bn_does_not_fold_when_the_stem_output_is_also_the_identity():
    # widen_factor 1: block1's first block is equal in/out, so the stem's output also feeds the residual add
    pairs = dict(find_conv_bn_pairs(WideResNet(depth=10, widen_factor=1)))
    assert "conv1" not in pairs and len(pairs) == 3


def test_a_wrapper_that_cannot_be_traced_still_folds_its_children():
    from rslad_fast.engine.teacher import CastTeacher, freeze

    inner = _model("wrn10-2", "cpu")
    teacher = freeze(CastTeacher(inner, torch.bfloat16))  # forward: an autocast block fx cannot trace
    folded = fold_bn(teacher)
    assert sum(isinstance(m, _BatchNorm) for m in folded.modules()) == 9 - 4
    assert all(t.dtype == torch.bfloat16 for t in folded.parameters())
    x = _input(4, "cpu")
    with torch.no_grad():
        ref = teacher(x)
        out = folded(x)
    assert out.dtype == torch.float32
    assert _rel(out, ref) < 2e-2


# ---- the folded pass equals the eval-mode pass -----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_and_input_grad_fp32(arch, channels_last, device):
    model = _model(arch, device, channels_last)
    folded = fold_bn(model)
    x = _input(4, device, channels_last)
    ref_logits, ref_grad = _forward_and_grad(model, x)
    logits, grad = _forward_and_grad(folded, x)
    assert _rel(logits, ref_logits) < 1e-5
    assert _rel(grad, ref_grad) < 2e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_and_input_grad_bf16_autocast(arch, channels_last, device):
    model = _model(arch, device, channels_last)
    folded = fold_bn(model)
    x = _input(4, device, channels_last)
    ref_logits, ref_grad = _forward_and_grad(model, x)  # fp32: the reference both bf16 passes approximate
    bf_logits, bf_grad = _forward_and_grad(model, x, torch.bfloat16)
    logits, grad = _forward_and_grad(folded, x, torch.bfloat16)
    assert _rel(logits, bf_logits) < 2e-2
    assert _rel(logits, ref_logits) < 2 * _rel(bf_logits, ref_logits) + 1e-3
    assert _rel(grad, ref_grad) < 2 * _rel(bf_grad, ref_grad) + 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "arch, channels_last",
    [(a, False) for a in ARCHS] + [("mnv2", True)],  # sized for a 2-core CPU: ResNet-18's attack is the slow one
    ids=lambda v: v if isinstance(v, str) else ("channels_last" if v else "contiguous"),
)
def test_pgd_x_adv_matches(arch, channels_last, device):
    """RSLAD's 10-step attack (fused_kl_pgd, eval mode) on the folded copy and on the model, same start.

    A value of x' can only differ where some step's input-gradient component is within float rounding of
    zero, so its sign flips; that value then moves 2 alpha the other way, and sign-PGD being chaotic, later
    steps of that image may follow. Rounding alone does this: seen on the CPU at batch 8 after two SGD
    steps, the folded copy's x' differed from the model's in 0-1.7% of its values, and so did the model's own
    x' in channels_last from its x' in contiguous layout (0-1.7%). The bound, 5%, sits above that noise and
    well below what a wrong fold gives: with one folded conv's bias dropped (a BN's shift lost), 28-29% of
    x' differed for MobileNetV2 and the WRN."""
    model = _model(arch, device, channels_last)
    folded = fold_bn(model)
    x = _input(4, device, channels_last)
    t_logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)).to(device)

    def attack(m):
        return fused_kl_pgd(m, x, t_logits, cuda_graph=False, generator=torch.Generator(device).manual_seed(4))

    ref, out = attack(model), attack(folded)
    share = (out != ref).float().mean().item()
    assert share <= 0.05, f"{share:.2%} of x' differs"
    assert (out - x).abs().max().item() <= 8 / 255 + 1e-6


# ---- the copy is separate, eval-only, and follows training through refresh() ------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["tiny", "mnv2", "wrn10-2"])
def test_copy_shares_nothing_and_leaves_the_model_untouched(arch, device):
    model = _model(arch, device, channels_last=True)
    model.train()
    model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, _BatchNorm))).eval()
    modes = [m.training for m in model.modules()]
    state = {k: (v.clone(), v.data_ptr(), v.stride()) for k, v in model.state_dict(keep_vars=True).items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]

    copy = FoldedCopy(model)
    copy.refresh()
    folded = copy.module

    assert [m.training for m in model.modules()] == modes
    assert [type(m) for m in model.modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    for k, v in model.state_dict(keep_vars=True).items():
        value, ptr, stride = state[k]
        assert v.data_ptr() == ptr and v.stride() == stride and torch.equal(v, value), k
    model_storages = {t.untyped_storage().data_ptr() for t in _tensors(model)}
    assert not model_storages & {t.untyped_storage().data_ptr() for t in _tensors(folded)}
    # eval mode, no parameter gradients, same dtype and memory format as the model's
    assert not any(m.training for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    for name, m in folded.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            src = model.get_submodule(name).weight
            assert m.weight.dtype == src.dtype and m.weight.stride() == src.stride(), name


def test_the_copy_is_eval_only():
    folded = fold_bn(_model("tiny", "cpu"))
    with pytest.raises(RuntimeError, match="eval mode only"):
        folded.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        with model_mode(folded, "train"):
            pass
    folded.eval()
    with model_mode(folded, "eval"):
        assert not folded.training
    assert not any(m.training for m in folded.modules())


def test_a_ddp_style_wrapper_is_unwrapped():
    model = _model("tiny", "cpu")
    wrapped = torch.nn.DataParallel(model)  # same `.module` convention as DistributedDataParallel
    folded = fold_bn(wrapped)
    assert type(folded) is type(model)
    x = _input(4, "cpu")
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5


def test_explicit_pairs():
    model = _model("tiny", "cpu")
    folded = fold_bn(model, pairs=[("conv2", "bn2")])
    assert isinstance(folded.bn1, _BatchNorm) and isinstance(folded.bn2, torch.nn.Identity)
    x = _input(4, "cpu")
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5
    with pytest.raises(ValueError, match="not a conv followed by a BatchNorm"):
        fold_bn(model, pairs=[("linear", "bn2")])


def _train_step(model, opt, x, y):
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["tiny", "mnv2", "resnet18", "wrn10-2"])
def test_refresh_after_optimizer_step(arch, device):
    """After a train-mode step (new weights and running statistics), refresh() rewrites the copy in place
    (its tensors keep their storage, strides and dtype, as a CUDA graph over them needs) to exactly what a
    fresh fold_bn of the updated model holds."""
    model = _model(arch, device, channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    copy = FoldedCopy(model)
    layout = [(t.data_ptr(), t.stride(), t.dtype) for t in _tensors(copy.module)]
    x = _input(4, device, channels_last=True)
    y = torch.arange(4, device=device)
    for _ in range(2):
        _train_step(model, opt, x, y)
    model.eval()
    with torch.no_grad():
        ref_logits, stale_logits = model(x), copy.module(x)
    assert _rel(stale_logits, ref_logits) > 1e-3  # the copy does not follow the model by itself
    assert copy.refresh() is copy.module
    fresh = fold_bn(model)
    assert [(t.data_ptr(), t.stride(), t.dtype) for t in _tensors(copy.module)] == layout
    got, want = copy.module.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with torch.no_grad():
        assert _rel(copy.module(x), ref_logits) < 1e-5


@pytest.mark.cuda
def test_cuda_graph_replay_after_refresh_uses_the_new_weights():
    """The folded copy under fused_kl_pgd's CUDA graph: captured once; after an optimizer step and refresh()
    the replay of the same graph (the copy's tensors did not move) computes exactly what an eager attack on
    the refreshed copy computes, which is not what it computed before the step."""
    from rslad_fast.attacks import graphed

    device = "cuda"
    model = _model("mnv2", device, channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    copy = FoldedCopy(model)
    x = _input(8, device, channels_last=True)
    y = torch.arange(8, device=device) % 10
    t_logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(3)).to(device)

    def attack(graph):
        gen = torch.Generator(device).manual_seed(4)
        return fused_kl_pgd(copy.module, x, t_logits, cuda_graph=graph, generator=gen)

    graphed.clear_cache()
    before = attack(True)
    torch.testing.assert_close(before, attack(False), rtol=0, atol=0)
    assert len(graphed._GRAPHS) == 1
    _train_step(model, opt, x, y)
    copy.refresh()
    after = attack(True)
    assert len(graphed._GRAPHS) == 1  # replayed, not recaptured
    torch.testing.assert_close(after, attack(False), rtol=0, atol=0)
    assert not torch.equal(after, before)
    model.eval()
    assert (
        after != fused_kl_pgd(model, x, t_logits, cuda_graph=False, generator=torch.Generator(device).manual_seed(4))
    ).float().mean().item() <= 0.05
