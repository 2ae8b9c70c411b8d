"""Model zoo and checkpoint loading.

Big models are checked on the ``meta`` device (shapes and parameter counts without allocating memory);
real forward passes use batch 2, 32x32 inputs and reduced-size variants, so the file runs in seconds on a
shared 2-core CPU.
"""

import os
import pickle

import pytest
import torch

from rslad_fast.errors import UserError
from rslad_fast.models import ARCHS, TinyCNN, build, canonical_name
from rslad_fast.models.loading import load_checkpoint_into, load_state_dict_file
from rslad_fast.models.wideresnet import WideResNet
from rslad_fast.models.wrn_dm import DMWideResNet


def _meta(name, **kw):
    with torch.device("meta"):
        return build(name, **kw)


def _nparams(model, skip_prefix=None):
    return sum(p.numel() for n, p in model.named_parameters() if not (skip_prefix and n.startswith(skip_prefix)))


def _x(b=2):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- architectures


def test_archs_are_canonical():
    assert ARCHS == (
        "resnet18",
        "mnv2",
        "wrn34-10",
        "wrn70-16",
        "wrn34-20",
        "dm-wrn28-10",
        "dm-wrn70-16",
        "resnet56",
        "resnet8",
        "tiny",
    )
    for a in ARCHS:
        assert canonical_name(a) == a


@pytest.mark.parametrize("name", ["resnet18", "mnv2", "resnet8", "tiny"])
def test_forward_shape_small_archs(name):
    torch.manual_seed(0)
    model = build(name).eval()
    x = _x().requires_grad_(True)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()  # attacks need input gradients
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ARCHS)
def test_full_size_output_shape_on_meta(name):
    model = _meta(name, num_classes=100)
    assert model(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, 100)


@pytest.mark.parametrize(
    "name,expected,tol",
    [
        ("resnet18", 11_173_962, 0),
        ("mnv2", 2_296_922, 0),
        ("wrn70-16", 266_796_506, 0),
        ("resnet8", 78_042, 0),  # He et al.'s CIFAR ResNet-8 (n = 1, widths 16/32/64), ~78k
        ("tiny", 5_466, 0),
    ],
)
def test_parameter_counts(name, expected, tol):
    assert abs(_nparams(_meta(name)) - expected) <= tol


def test_wrn34_10_parameter_count():
    """46.16M take part in forward; TRADES' unused sub_block1 adds 2.10M more to the module."""
    model = _meta("wrn34-10")
    assert _nparams(model, skip_prefix="sub_block1.") == 46_160_474
    assert _nparams(model) == 48_262_586


def test_trades_wrn_keys():
    keys = set(_meta("wrn34-10").state_dict())
    for k in [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.conv1.weight",
        "block1.layer.0.convShortcut.weight",
        "block1.layer.4.conv2.weight",
        "sub_block1.layer.0.bn1.weight",
        "sub_block1.layer.0.convShortcut.weight",
        "block2.layer.0.convShortcut.weight",
        "block3.layer.4.bn2.running_var",
        "bn1.weight",
        "bn1.running_mean",
        "fc.weight",
        "fc.bias",
    ]:
        assert k in keys, k
    assert "block1.layer.1.convShortcut.weight" not in keys  # identity blocks have no shortcut
    assert "block1.layer.5.bn1.weight" not in keys  # depth 34 -> 5 blocks per stage
    assert not any("mean" == k or "std" == k for k in keys)


def test_trades_wrn_forward_ignores_sub_block1():
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1).eval()
    x = _x()
    before = model(x)
    assert before.shape == (2, 10)
    with torch.no_grad():
        for p in model.sub_block1.parameters():
            p.add_(1.0)
    assert torch.equal(model(x), before)


def test_dm_wrn_keys_and_buffers():
    model = _meta("wrn70-16")
    keys = set(model.state_dict())
    for k in [
        "init_conv.weight",
        "layer.0.block.0.batchnorm_0.weight",
        "layer.0.block.0.conv_0.weight",
        "layer.0.block.0.batchnorm_1.running_mean",
        "layer.0.block.0.conv_1.weight",
        "layer.0.block.0.shortcut.weight",
        "layer.1.block.0.shortcut.weight",
        "layer.2.block.10.conv_1.weight",
        "batchnorm.weight",
        "logits.weight",
        "logits.bias",
    ]:
        assert k in keys, k
    assert "layer.2.block.11.conv_1.weight" not in keys  # depth 70 -> 11 blocks per group
    assert "layer.0.block.1.shortcut.weight" not in keys
    assert "mean" not in keys and "std" not in keys  # non-persistent normalization
    buffers = dict(model.named_buffers())
    assert buffers["mean"].shape == (3, 1, 1) and buffers["std"].shape == (3, 1, 1)


def test_dm_wrn_small_forward_padding_and_normalization():
    torch.manual_seed(0)
    model = DMWideResNet(depth=10, width=1).eval()
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    assert torch.allclose(model.std.flatten(), torch.tensor([0.2471, 0.2435, 0.2616]))
    seen = {}
    hooks = [
        model.layer[i]
        .block[0]
        .conv_0.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, tuple(a[0].shape[-2:])))
        for i in range(3)
    ]
    x = _x()
    out = model(x)
    for h in hooks:
        h.remove()
    assert out.shape == (2, 10)
    assert model.layer[1].block[0].conv_0.padding == (0, 0)
    # stride 1: padded 32 -> 34 on both sides; stride 2: padded only right/bottom (32 -> 33, 16 -> 17)
    assert seen == {0: (34, 34), 1: (33, 33), 2: (17, 17)}
    # normalization happens inside: an identity normalization changes the output
    model.mean.zero_()
    model.std.fill_(1.0)
    assert not torch.allclose(model(x), out)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "alias,canon",
    [
        ("resnet18", "resnet18"),
        ("ResNet-18", "resnet18"),
        ("resnet_18", "resnet18"),
        ("RN18", "resnet18"),
        ("mobilenet_v2", "mnv2"),
        ("MobileNetV2", "mnv2"),
        ("mnv2", "mnv2"),
        ("MNV2", "mnv2"),
        ("wrn-34-10", "wrn34-10"),
        ("wrn_34_10", "wrn34-10"),
        ("WideResNet34-10", "wrn34-10"),
        ("wrn34-10", "wrn34-10"),
        ("wrn-70-16", "wrn70-16"),
        ("WRN_70_16", "wrn70-16"),
        ("wideresnet-70-16", "wrn70-16"),
        ("tiny", "tiny"),
        ("TINY", "tiny"),
        ("ResNet-8", "resnet8"),
        ("rn8", "resnet8"),
    ],
)
def test_aliases(alias, canon):
    assert canonical_name(alias) == canon


@pytest.mark.parametrize("bad", ["resnet50", "wrn-28-10", "", "vgg16"])
def test_unknown_arch(bad):
    with pytest.raises(UserError, match=r"unknown architecture .*choose one of: resnet18, mnv2"):
        build(bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True, None])
def test_bad_num_classes(bad):
    with pytest.raises(UserError, match="num_classes must be a positive integer"):
        build("tiny", num_classes=bad)


def test_num_classes():
    assert build("tiny", num_classes=100)(_x()).shape == (2, 100)


# ---------------------------------------------------------------- loading


def _trained_tiny():
    torch.manual_seed(1)
    model = TinyCNN()
    model.train()
    model(_x())  # move BN running stats away from their init
    return model


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "training", "nested"])
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model."])
def test_round_trip(tmp_path, wrap, prefix):
    src = _trained_tiny()
    sd = _prefixed(src.state_dict(), prefix)
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd},
        "model": {"model": sd},
        "training": {"model": sd, "optimizer": opt.state_dict(), "epoch": 3, "args": {"lr": 0.1}},
        "nested": {"model": {"state_dict": sd}, "epoch": 7},
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    assert set(load_state_dict_file(path)) == set(src.state_dict())
    dst = load_checkpoint_into(TinyCNN(), path, arch_name="tiny")
    _assert_same(src, dst)


def test_legacy_serialization_format(tmp_path):
    """TRADES' model_cifar_wrn.pt predates the zip format; weights_only must still read the old one."""
    src = _trained_tiny()
    path = tmp_path / "legacy.pt"
    torch.save(src.state_dict(), path, _use_new_zipfile_serialization=False)
    _assert_same(src, load_checkpoint_into(TinyCNN(), path, "tiny"))


def test_round_trip_resnet18_dataparallel_style(tmp_path):
    src = build("resnet18")
    path = tmp_path / "rn.pt"
    torch.save(_prefixed(src.state_dict(), "module."), path)
    _assert_same(src, load_checkpoint_into(build("resnet18"), str(path), "resnet18"))


def test_dm_constants_in_file_are_dropped_or_checked(tmp_path):
    """RobustBench files store the DM model's mean/std; equal values load, different ones are refused."""
    src = DMWideResNet(depth=10, width=1)
    sd = dict(src.state_dict(), mean=src.mean.clone(), std=src.std.clone())
    path = tmp_path / "dm.pt"
    torch.save(sd, path)
    _assert_same(src, load_checkpoint_into(DMWideResNet(depth=10, width=1), path))
    torch.save(dict(sd, mean=torch.full((1, 3, 1, 1), 0.5)), path)
    with pytest.raises(UserError, match="'mean'.*differs"):
        load_checkpoint_into(DMWideResNet(depth=10, width=1), path)


def test_strict_mismatch_lists_keys(tmp_path):
    sd = _trained_tiny().state_dict()
    sd.pop("bn2.running_var")
    sd["head.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(UserError) as err:
        load_checkpoint_into(TinyCNN(), path, arch_name="tiny")
    msg = str(err.value)
    assert "architecture 'tiny'" in msg and str(path) in msg
    assert "missing keys: 1 (bn2.running_var)" in msg
    assert "unexpected keys: 1 (head.weight)" in msg


def test_wrong_architecture_truncates_lists(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(_trained_tiny().state_dict(), path)
    with pytest.raises(UserError) as err:
        load_checkpoint_into(DMWideResNet(depth=10, width=1), path, arch_name="wrn70-16")
    msg = str(err.value)
    assert "architecture 'wrn70-16'" in msg
    assert "missing keys: " in msg and "... and " in msg and "more" in msg
    assert "unexpected keys: 14 (" in msg  # tiny has 14 entries: 10 shown + "... and 4 more"
    assert "another architecture" in msg
    assert "\n" not in msg


def test_shape_mismatch(tmp_path):
    path = tmp_path / "c100.pt"
    torch.save(TinyCNN(num_classes=100).state_dict(), path)
    with pytest.raises(UserError, match=r"shape mismatch.*linear\.weight \(100, 32\) vs \(10, 32\)"):
        load_checkpoint_into(TinyCNN(num_classes=10), path, arch_name="tiny")


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_state_dict_file(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="is a directory"):
        load_checkpoint_into(TinyCNN(), tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"hello, this is not a checkpoint\n", os.urandom(4096), "truncated-half", "truncated-head"]
)
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "corrupt.pt"
    if isinstance(content, str):
        torch.save(_trained_tiny().state_dict(), path)
        data = path.read_bytes()
        content = data[: len(data) // 2] if content == "truncated-half" else data[:100]
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"checkpoint {path}: (file is empty|not a readable)") as err:
        load_state_dict_file(path)
    assert "\n" not in str(err.value)


def test_no_state_dict_inside(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="no state dict found"):
        load_state_dict_file(path)
    torch.save({"optimizer": {}, "epoch": 1}, path)
    with pytest.raises(UserError, match="no state dict found.*'optimizer'"):
        load_state_dict_file(path)


class _Evil:
    """Unpickling this would run a shell command (creating ``marker``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["pickle-2", "pickle-default", "torch.save"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"x": _Evil(marker), "state_dict": {"w": torch.zeros(1)}}  # the evil object is met first
    if writer.startswith("pickle"):
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2 if writer == "pickle-2" else None)
    else:
        torch.save(payload, path)
    # protocol 2 and torch.save reach the os.system global and are refused by name; torch's weights-only
    # unpickler rejects newer pickle protocols before that, as unreadable. Either way: refused, no effect.
    pattern = "not a readable" if writer == "pickle-default" else r"refused, loading it would run code \(\S*system\)"
    with pytest.raises(UserError, match=f"checkpoint {path}: {pattern}"):
        load_checkpoint_into(TinyCNN(), path)
    assert not marker.exists()


# A diverged run leaves NaN/inf in its weights or BatchNorm statistics; such a file must not load: as a
# teacher it would train a student on garbage, in evaluate it would report ~10% accuracy as a result.
@pytest.mark.parametrize(
    "name,value",
    [
        ("conv1.weight", float("nan")),
        ("linear.bias", float("inf")),
        ("bn2.running_var", float("-inf")),
        ("bn1.running_mean", float("nan")),
    ],
)
def test_non_finite_weights_are_refused(tmp_path, name, value):
    sd = _trained_tiny().state_dict()
    sd[name].view(-1)[0] = value
    path = tmp_path / "diverged.pt"
    torch.save({"model": sd, "epoch": 2}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint_into(TinyCNN(), path, "tiny")
    msg = str(err.value)
    assert str(path) in msg and repr(name) in msg and "non-finite" in msg and "\n" not in msg


def test_non_finite_refused_for_teacher_and_evaluate(tmp_path, capsys):
    from rslad_fast import evaluate
    from rslad_fast.engine.teacher import load_teacher

    sd = _trained_tiny().state_dict()
    sd["bn1.running_var"][3] = float("inf")
    path = tmp_path / "teacher.pt"
    torch.save(sd, path)
    with pytest.raises(UserError, match="'bn1.running_var'.*non-finite"):
        load_teacher(path, "tiny")
    # evaluate loads every checkpoint before it reads the data: no data folder needed to see the refusal
    rc = evaluate.main(
        [
            "--ckpt",
            str(path),
            "--arch",
            "tiny",
            "--attacks",
            "clean",
            "--data",
            str(tmp_path / "no_data"),
            "--no-download",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "error: checkpoint" in err and "non-finite" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _opt_state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(_x()).sum().backward()
    opt.step()  # a real momentum buffer: the optimizer state holds tensors under integer keys
    return opt.state_dict()


@pytest.mark.parametrize("wrap", ["ard", "model_state_dict", "iad", "equal_twice"])
def test_official_containers(tmp_path, wrap):
    """ARD saves {'net': DataParallel state dict, 'optimizer': ...} (.t7), IAD {'state_dict', 'optimizer',
    'epoch', ...}, the PyTorch tutorials {'model_state_dict', 'optimizer_state_dict', ...}; the same
    weights under two names are not ambiguous."""
    src = _trained_tiny()
    sd = src.state_dict()
    obj = {
        "ard": {"net": _prefixed(sd, "module."), "optimizer": _opt_state(_trained_tiny()), "epoch": 99},
        "model_state_dict": {
            "model_state_dict": sd,
            "optimizer_state_dict": _opt_state(_trained_tiny()),
            "epoch": 4,
            "loss": 0.5,
        },
        "iad": {
            "epoch": 10,
            "state_dict": _prefixed(sd, "module."),
            "test_nat_acc": 80.0,
            "optimizer": _opt_state(_trained_tiny()),
        },
        "equal_twice": {"state_dict": sd, "model": _prefixed(sd, "module.")},
    }[wrap]
    path = tmp_path / "official.t7"
    torch.save(obj, path)
    _assert_same(src, load_checkpoint_into(TinyCNN(), path, "tiny"))


@pytest.mark.parametrize("keys", [("state_dict", "model"), ("net", "model_state_dict"), ("net", "state_dict")])
def test_two_different_state_dicts_are_ambiguous(tmp_path, keys):
    a, b = _trained_tiny().state_dict(), TinyCNN().state_dict()
    path = tmp_path / "two.pt"
    torch.save({keys[0]: a, keys[1]: b, "epoch": 1}, path)
    with pytest.raises(UserError) as err:
        load_state_dict_file(path)
    msg = str(err.value)
    assert str(path) in msg and "ambiguous" in msg and all(repr(k) in msg for k in keys) and "\n" not in msg
