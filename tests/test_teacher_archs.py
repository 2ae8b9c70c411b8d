"""The teacher architectures of the post-RSLAD methods (issue 21, item 4), loaded from state dicts written in
their published key layouts, and the one line a file of another layout gets.

Each published layout is written out here from the published code, independently of rslad_fast.models: the
key names and shapes (``*_layout``), generated weights for them (``_weights``) and a forward pass in
torch.nn.functional ops (``*_forward``), read from
- Chen2021LTD's WRN-34-20: RobustBench ``architectures/wide_resnet.py`` ``WideResNet(depth=34, widen_factor=20,
  sub_block1=False)`` (``model_zoo/cifar10.py``, entry ``Chen2021LTD_WRN34_20``; AdaAD main.py builds the same);
- the DeepMind WRNs: RobustBench ``architectures/dm_wide_resnet.py`` ``DMWideResNet(num_classes, depth, width,
  activation_fn=nn.SiLU, mean, std)`` (Wang2023Better_WRN-28-10 / WRN-70-16 of ``cifar10.py`` and
  ``cifar100.py``; Gowal's and Rebuffi's entries pass Swish, the same function);
- MTARD's ResNet-56: zhaoshiji123/MTARD ``cifar10_nat_teacher_models/resnet.py`` ``CifarResNet(BasicBlock,
  [9, 9, 9])``.
A model loads such a file strictly and must give the reference's logits bit for bit (same ops, same order).
Full-size networks are checked key by key and shape by shape on the ``meta`` device (no memory); the forward
passes use the same classes at depth 10 / width 2 (ResNet-56 itself at full size: it is small).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rslad_fast.errors import UserError
from rslad_fast.models import ARCHS, build, canonical_name
from rslad_fast.models.fold import fold_bn, fold_report
from rslad_fast.models.loading import load_checkpoint_into
from rslad_fast.models.resnet56 import CifarResNet
from rslad_fast.models.wrn_dm import dm_wrn
from rslad_fast.models.wrn_ltd import WideResNetLTD

# RobustBench dm_wide_resnet.py's constants, as published
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
NEW = ("wrn34-20", "dm-wrn28-10", "dm-wrn70-16", "resnet56")


def _bn(prefix, n):
    return {f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


# ---- the published layouts: key -> shape ----------------------------------------------------------------


def ltd_layout(depth, width, classes):
    """RobustBench wide_resnet.py WideResNet, sub_block1=False, bias_last=True."""
    n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    out = {"conv1.weight": (16, 3, 3, 3)}
    for b in range(3):
        for i in range(n):
            cin, cout = (ch[b] if i == 0 else ch[b + 1]), ch[b + 1]
            p = f"block{b + 1}.layer.{i}"
            out |= _bn(f"{p}.bn1", cin) | {f"{p}.conv1.weight": (cout, cin, 3, 3)}
            out |= _bn(f"{p}.bn2", cout) | {f"{p}.conv2.weight": (cout, cout, 3, 3)}
            if cin != cout:
                out[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
    return out | _bn("bn1", ch[3]) | {"fc.weight": (classes, ch[3]), "fc.bias": (classes,)}


def dm_layout(depth, width, classes):
    """RobustBench dm_wide_resnet.py DMWideResNet (mean/std: non-persistent, not in the file)."""
    n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    out = {"init_conv.weight": (16, 3, 3, 3)}
    for g in range(3):
        for i in range(n):
            cin, cout = (ch[g] if i == 0 else ch[g + 1]), ch[g + 1]
            p = f"layer.{g}.block.{i}"
            out |= _bn(f"{p}.batchnorm_0", cin) | {f"{p}.conv_0.weight": (cout, cin, 3, 3)}
            out |= _bn(f"{p}.batchnorm_1", cout) | {f"{p}.conv_1.weight": (cout, cout, 3, 3)}
            if cin != cout:
                out[f"{p}.shortcut.weight"] = (cout, cin, 1, 1)
    return out | _bn("batchnorm", ch[3]) | {"logits.weight": (classes, ch[3]), "logits.bias": (classes,)}


def mtard_resnet_layout(n, classes):
    """MTARD cifar10_nat_teacher_models/resnet.py CifarResNet(BasicBlock, [n] * 3)."""
    out = {"conv1.weight": (16, 3, 3, 3)} | _bn("bn1", 16)
    cin = 16
    for s, cout in enumerate((16, 32, 64)):
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            out |= {f"{p}.conv1.weight": (cout, cin, 3, 3)} | _bn(f"{p}.bn1", cout)
            out |= {f"{p}.conv2.weight": (cout, cout, 3, 3)} | _bn(f"{p}.bn2", cout)
            if i == 0 and s > 0:  # stride 2 / width change: downsample = conv1x1 + BN
                out |= {f"{p}.downsample.0.weight": (cout, cin, 1, 1)} | _bn(f"{p}.downsample.1", cout)
            cin = cout
    return out | {"fc.weight": (classes, 64), "fc.bias": (classes,)}


def _weights(layout, seed=0):
    """Generated tensors for a layout: conv/linear weights at a He-like scale, BatchNorms with non-trivial
    affine parameters and running statistics (fresh ones would hide a swapped key)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith("bias"):
            sd[k] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BN weight
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


# ---- the reference forwards, in torch.nn.functional ------------------------------------------------------


def _bnf(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])


def ltd_forward(sd, x):
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for b in (1, 2, 3):
        i = 0
        while f"block{b}.layer.{i}.conv1.weight" in sd:
            p, stride = f"block{b}.layer.{i}", (2 if b > 1 and i == 0 else 1)
            act = F.relu(_bnf(sd, f"{p}.bn1", out))
            o = F.relu(_bnf(sd, f"{p}.bn2", F.conv2d(act, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            o = F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1)
            short = sd.get(f"{p}.convShortcut.weight")
            out = torch.add(out if short is None else F.conv2d(act, short, stride=stride), o)
            i += 1
    out = F.avg_pool2d(F.relu(_bnf(sd, "bn1", out)), 8)
    return F.linear(out.view(-1, sd["fc.weight"].shape[1]), sd["fc.weight"], sd["fc.bias"])


def dm_forward(sd, x, mean, std):
    out = F.conv2d(
        (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1), sd["init_conv.weight"], padding=1
    )
    for g in range(3):
        i = 0
        while f"layer.{g}.block.{i}.conv_0.weight" in sd:
            p, stride = f"layer.{g}.block.{i}", (2 if g > 0 and i == 0 else 1)
            act = F.silu(_bnf(sd, f"{p}.batchnorm_0", out))
            v = F.pad(act, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))  # TF "SAME"
            o = F.silu(_bnf(sd, f"{p}.batchnorm_1", F.conv2d(v, sd[f"{p}.conv_0.weight"], stride=stride)))
            o = F.conv2d(o, sd[f"{p}.conv_1.weight"], padding=1)
            short = sd.get(f"{p}.shortcut.weight")
            out = torch.add(out if short is None else F.conv2d(act, short, stride=stride), o)
            i += 1
    out = F.avg_pool2d(F.silu(_bnf(sd, "batchnorm", out)), 8)
    return F.linear(out.view(-1, sd["logits.weight"].shape[1]), sd["logits.weight"], sd["logits.bias"])


def mtard_resnet_forward(sd, x):
    out = F.relu(_bnf(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1)))
    for s in (1, 2, 3):
        i = 0
        while f"layer{s}.{i}.conv1.weight" in sd:
            p, stride = f"layer{s}.{i}", (2 if s > 1 and i == 0 else 1)
            o = F.relu(_bnf(sd, f"{p}.bn1", F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            o = _bnf(sd, f"{p}.bn2", F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.0.weight" in sd:
                out = _bnf(sd, f"{p}.downsample.1", F.conv2d(out, sd[f"{p}.downsample.0.weight"], stride=stride))
            out = F.relu(o + out)
            i += 1
    out = F.adaptive_avg_pool2d(out, 1)
    return F.linear(out.view(out.size(0), -1), sd["fc.weight"], sd["fc.bias"])


# ---- (arch, the published layout at full size, a reduced model + its layout + its reference forward) -----

CASES = {
    "wrn34-20": (
        lambda c: ltd_layout(34, 20, c),
        lambda c: (WideResNetLTD(depth=10, widen_factor=2, num_classes=c), ltd_layout(10, 2, c), ltd_forward),
    ),
    "dm-wrn28-10": (
        lambda c: dm_layout(28, 10, c),
        lambda c: (
            dm_wrn(10, 2, c),
            dm_layout(10, 2, c),
            lambda sd, x: dm_forward(sd, x, *(CIFAR10 if c == 10 else CIFAR100)),
        ),
    ),
    "dm-wrn70-16": (lambda c: dm_layout(70, 16, c), None),  # the same class as dm-wrn28-10
    "resnet56": (
        lambda c: mtard_resnet_layout(9, c),
        lambda c: (CifarResNet(n=9, num_classes=c), mtard_resnet_layout(9, c), mtard_resnet_forward),
    ),
}


def _x(b=3, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registered():
    for arch in NEW:
        assert arch in ARCHS and canonical_name(arch) == arch
    assert canonical_name("WRN-34-20") == "wrn34-20" and canonical_name("DM_WRN_28_10") == "dm-wrn28-10"
    assert canonical_name("ResNet-56") == "resnet56" and canonical_name("dmwrn7016") == "dm-wrn70-16"


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("arch", NEW)
def test_full_size_keys_and_shapes_are_the_published_ones(arch, classes):
    with torch.device("meta"):
        model = build(arch, classes)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == CASES[arch][0](classes)


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("arch", [a for a in NEW if CASES[a][1]])
def test_loads_the_published_layout_with_identical_logits(arch, classes, tmp_path):
    model, layout, forward = CASES[arch][1](classes)
    sd = _weights(layout)
    path = tmp_path / "published.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)  # as DataParallel saved them (AdaAD strips it)
    load_checkpoint_into(model, path, arch).eval()
    x = _x()
    with torch.no_grad():
        got, want = model(x), forward(sd, x)
    assert got.shape == (3, classes)
    assert torch.equal(got, want)


def test_resnet56_full_size_through_build(tmp_path):
    sd = _weights(mtard_resnet_layout(9, 10), seed=3)
    path = tmp_path / "cifar10_resnet56.pt"
    torch.save(sd, path)
    model = load_checkpoint_into(build("resnet56", 10), path, "resnet56").eval()
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(model(x), mtard_resnet_forward(sd, x))


def test_dm_normalization_is_the_published_one_per_data_set():
    """CIFAR-10 entries normalize with the CIFAR-10 constants, CIFAR-100 entries with the CIFAR-100 ones,
    whatever --wrn70-16-norm says (that flag is RSLAD's wrn70-16's)."""
    for arch in ("dm-wrn28-10", "dm-wrn70-16"):
        for classes, (mean, std) in ((10, CIFAR10), (100, CIFAR100)):
            with torch.device("meta"):
                model = build(arch, classes, normalization="cifar10")
            assert model.mean.shape == (3, 1, 1) and "mean" not in model.state_dict()
            small = dm_wrn(10, 1, classes)
            assert torch.equal(small.mean.flatten(), torch.tensor(mean))
            assert torch.equal(small.std.flatten(), torch.tensor(std))


@pytest.mark.parametrize("arch", ["wrn34-20", "resnet56"])
def test_new_archs_fold(arch):
    """fold.py finds the pairs by tracing (no per-architecture code): the folded copy computes the same logits
    (within fp32 rounding); ResNet-56: every BN follows its conv (stem 1, 27 blocks x 2, 2 downsample); the
    LTD WRN: each block's bn2 and the first block's bn1 (reads the stem conv only), as TRADES'."""
    model, layout, _ = CASES[arch][1](10)
    model.load_state_dict(_weights(layout, seed=5))
    model.eval()
    expected = {"resnet56": {"folded": 57, "total": 57}, "wrn34-20": {"folded": 4, "total": 7}}[arch]
    assert fold_report(model) == expected
    x = _x(2)
    with torch.no_grad():
        ref, got = model(x), fold_bn(model)(x)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


# ---- a file of another layout: one line, found vs expected ---------------------------------------------


def _refusal(model, path, arch):
    with pytest.raises(UserError) as err:
        load_checkpoint_into(model, path, arch)
    msg = str(err.value)
    assert "\n" not in msg and f"does not match architecture {arch!r}" in msg
    return msg


def test_wrong_layout_names_found_and_expected(tmp_path):
    r56 = tmp_path / "resnet56.pt"
    torch.save(_weights(mtard_resnet_layout(9, 10)), r56)
    with torch.device("meta"):  # the mismatch is found before any weight is copied: no memory for WRN-34-20
        ltd = build("wrn34-20", 10)
        trades = build("wrn34-10", 10)
        dm = build("dm-wrn28-10", 10)
    msg = _refusal(ltd, r56, "wrn34-20")
    assert "found torchvision's / chenyaofo's CIFAR ResNet-56" in msg and "architecture 'resnet56'" in msg
    assert "expected TRADES' / RobustBench's WideResNet WRN-34-20 without sub_block1" in msg

    small_ltd = tmp_path / "ltd_10_2.pt"  # Chen2021LTD's layout (no sub_block1) given as TRADES' WRN-34-10
    torch.save(_weights(ltd_layout(10, 2, 10)), small_ltd)
    msg = _refusal(trades, small_ltd, "wrn34-10")
    assert "found TRADES' / RobustBench's WideResNet WRN-10-2 without sub_block1" in msg
    assert "expected TRADES' / RobustBench's WideResNet WRN-34-10 with sub_block1" in msg

    small_dm = tmp_path / "dm_10_2.pt"  # same key names as dm-wrn28-10, other depth and width
    torch.save(_weights(dm_layout(10, 2, 10)), small_dm)
    msg = _refusal(dm, small_dm, "dm-wrn28-10")
    assert "found DeepMind's DMWideResNet WRN-10-2" in msg and "expected DeepMind's DMWideResNet WRN-28-10" in msg

    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(4, 3), "head.weight": torch.zeros(10, 4)}, other)
    msg = _refusal(build("resnet56", 10), other, "resnet56")
    assert "found an unrecognized layout (top-level encoder, head; 2 tensors)" in msg
    assert "expected torchvision's / chenyaofo's CIFAR ResNet-56" in msg


def test_train_refuses_a_mismatched_teacher_file_with_one_line(tmp_path, fake_cifar10):
    """`train --teacher F --teacher-arch NAME` through the real command line: exit status 2, one line."""
    data = fake_cifar10(n_train=64, n_test=32, seed=0)
    teacher = tmp_path / "Chen2021LTD_like.pt"
    torch.save({f"module.{k}": v for k, v in _weights(ltd_layout(10, 2, 10)).items()}, teacher)
    out = tmp_path / "run"
    argv = ["--method", "rslad", "--student", "tiny", "--teacher", str(teacher), "--teacher-arch", "resnet56"]
    argv += ["--data", str(data), "--epochs", "1", "--batch-size", "32", "--eval-n", "32", "--threads", "1"]
    argv += ["--no-progress", "--out", str(out)]
    p = subprocess.run(
        [sys.executable, "-m", "rslad_fast.train", *argv],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("error: teacher: checkpoint ") and "does not match architecture 'resnet56'" in lines[0]
    assert "found TRADES' / RobustBench's WideResNet WRN-10-2 without sub_block1" in lines[0]
    assert "expected torchvision's / chenyaofo's CIFAR ResNet-56" in lines[0]
    assert not out.exists()


def test_dm_file_with_the_other_data_sets_constants_is_refused(tmp_path):
    """A file that stores mean/std (DeepMind's own files may) must agree with the published normalization of
    the data set; the CIFAR-10 constants in a CIFAR-100 dm-wrn28-10 file are refused, saying so."""
    sd = _weights(dm_layout(10, 1, 100))
    path = tmp_path / "dm_c100.pt"
    torch.save(dict(sd, mean=torch.tensor(CIFAR100[0]).view(1, 3, 1, 1), std=torch.tensor(CIFAR100[1])), path)
    load_checkpoint_into(dm_wrn(10, 1, 100), path, "dm-wrn28-10")  # its own constants: dropped, loads
    torch.save(dict(sd, mean=torch.tensor(CIFAR10[0]).view(1, 3, 1, 1)), path)
    msg = _refusal_any(dm_wrn(10, 1, 100), path, "dm-wrn28-10")
    assert "'mean'" in msg and "the cifar10 mean" in msg and "normalizes with its data set's constants" in msg


def _refusal_any(model, path, arch):
    with pytest.raises(UserError) as err:
        load_checkpoint_into(model, path, arch)
    assert "\n" not in str(err.value)
    return str(err.value)
