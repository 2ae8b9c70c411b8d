"""The engine's typed entry points driven directly (a `RunSettings` / `Config` in, a run directory out), and the
machine-dependent choices `resolve` makes: folded BatchNorm, the CPU's bf16 and memory format per architecture."""

from __future__ import annotations

import json

import pytest
import torch

from rslad_fast import engine
from rslad_fast.engine import RunDir, RunSettings, hardware, resolve
from rslad_fast.engine.build import build_parts, random_teacher
from rslad_fast.engine.config import Config
from rslad_fast.models.fold import FoldedCopy

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(student="tiny", device="cpu", threads=1, train_n=128, eval_n=32, batch_size=64, epochs=1)


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=256, n_test=64, seed=0)


def test_train_and_resume_through_the_typed_api(data, tmp_path, capsys):
    cfg = resolve(RunSettings(method="natural", data=str(data), **TINY))
    record = engine.train(cfg, tmp_path / "run", progress=False)
    rd = RunDir(tmp_path / "run")
    assert rd.completed_epochs() == (1, 1) and rd.config_dict()["method"] == "natural"
    assert [r["epoch"] for r in rd.metrics_records()] == [1] and record["epoch"] == 1
    assert engine.resume(rd.path, progress=False)["epoch"] == 1  # already complete: nothing trains
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(engine.dist.Agreed, match="already exists and is not empty"):
        engine.train(cfg, rd.path, progress=False)


def test_self_trained_teacher_is_a_stage_before_the_student(data, tmp_path):
    s = RunSettings(method="rslad", teacher_arch="tiny", preset="quick", data=str(data), **TINY)
    cfg = resolve(s)
    assert cfg.teacher["source"] == "trained" and cfg.teacher_run["method"] == "trades"
    assert cfg.teacher_run == resolve(engine.teacher_settings(s, cfg)).to_dict() | {"versions": cfg.versions}
    engine.train(cfg, tmp_path / "run", progress=False)
    teacher = RunDir(tmp_path / "run").teacher()
    assert teacher.completed_epochs()[0] == cfg.teacher_run["epochs"] and RunDir(tmp_path / "run").last.is_file()


# ---- folded BatchNorm -----------------------------------------------------------------------------------


def test_fold_bn_is_on_for_new_runs_off_for_old_configs_and_a_switch(data):
    cfg = resolve(RunSettings(method="rslad", teacher="t.pt", teacher_arch="tiny", data=str(data), **TINY))
    assert cfg.fold_bn is True
    assert resolve(RunSettings(method="rslad", fold_bn=False, teacher="t.pt", **TINY)).fold_bn is False
    old = cfg.to_dict()
    del old["fold_bn"]  # a config.json written before the field: it trained unfolded, and resumes so
    assert Config.from_dict(old).fold_bn is False


@pytest.mark.parametrize("method, folded", [("rslad", True), ("trades", True), ("ard", False), ("natural", False)])
def test_the_student_is_folded_only_for_an_eval_mode_attack(method, folded):
    teacher = {"teacher": "t.pt", "teacher_arch": "tiny"} if method in ("rslad", "ard") else {}
    cfg = resolve(RunSettings(method=method, **TINY, **teacher))
    parts = build_parts(cfg, torch.device("cpu"), random_teacher(cfg) if teacher else None, generator_seed=0)
    assert isinstance(parts.fold, FoldedCopy) == folded  # ARD's attack runs in train mode: it needs its BNs
    if teacher:  # the frozen teacher is folded once: no BatchNorm left in the tiny CNN
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in parts.teacher.modules())


def _steps(fold_bn: bool, steps: int = 2):
    cfg = resolve(
        RunSettings(
            method="rslad",
            student="resnet8",
            teacher="t.pt",
            teacher_arch="tiny",
            fold_bn=fold_bn,
            device="cpu",
            threads=1,
            batch_size=16,
            channels_last=False,
            amp="fp32",  # resnet8's CPU choice is bf16 where the CPU has it: this compares fp32 paths
        )
    )
    torch.manual_seed(1)
    teacher = random_teacher(cfg)
    parts = build_parts(cfg, torch.device("cpu"), teacher, generator_seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    assert (parts.fold is not None) == fold_bn
    for _ in range(steps):
        parts.step(x, y)
    return parts.student.state_dict()


def test_a_folded_run_trains_as_the_unfolded_one_up_to_rounding():
    """Two RSLAD steps (each refreshes the folded copy from the weights and BatchNorm statistics the previous
    step left) with and without folding: every weight and statistic agrees to float rounding."""
    a, b = _steps(True), _steps(False)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    "method, amp, train_fold", [("rslad", "fp32", "fp32"), ("rslad", "bf16", "bf16"), ("ard", "fp32", None)]
)
def test_the_per_epoch_evaluation_attacks_a_refreshed_fp32_folded_copy(method, amp, train_fold):
    """With --fold-bn the held-out PGD-20 runs on a folded copy: fp32 whatever the training's autocast, made
    from the student's weights and statistics as they are at evaluation time (not the attack's last refresh),
    and on the plain student with --no-fold-bn."""
    cfg = resolve(RunSettings(method=method, teacher="t.pt", amp=amp, fold_bn=True, **TINY))
    parts = build_parts(cfg, torch.device("cpu"), random_teacher(cfg), generator_seed=0)
    assert (parts.fold is not None) == (train_fold is not None)
    x = torch.rand(4, 3, 32, 32)
    for _ in range(2):
        parts.step(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))  # the attack refreshed, then SGD
        model = parts.eval_model()
        assert next(model.parameters()).dtype == torch.float32 and not model.training
        assert (model is getattr(parts.fold, "module", None)) == (train_fold == "fp32")
        with torch.no_grad():
            torch.testing.assert_close(model(x), parts.student.eval()(x), rtol=1e-5, atol=1e-5)
        parts.student.train()
    if train_fold != "fp32":
        assert model is parts.eval_fold.module  # one copy, made once
    parts.fold_bn = False
    assert parts.eval_model() is parts.student


# ---- the CPU's choices per architecture -----------------------------------------------------------------


@pytest.fixture
def cpu_bf16(monkeypatch):
    def set_(native: bool):
        monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "test", "flags": [], "native_bf16": native})
        import rslad_fast.engine.resolution as r

        monkeypatch.setattr(r, "cpu_info", hardware.cpu_info)

    return set_


def test_cpu_choices_follow_the_architecture_and_native_bf16(cpu_bf16):
    def pick(**s):
        c = resolve(RunSettings(device="cpu", threads=1, **s))
        return c.amp, c.channels_last, c.teacher_dtype

    cpu_bf16(True)
    assert pick(student="resnet18", teacher="t.pt") == ("bf16", True, "bf16")  # wrn34-10 teacher: bf16 pays
    assert pick(student="mnv2", teacher="t.pt") == ("fp32", True, "bf16")  # depthwise: bf16 gains nothing
    assert pick(student="tiny", method="natural") == ("fp32", False, "fp32")  # not measured: fp32, the preset's
    assert pick(student="resnet8", method="trades") == ("bf16", True, "fp32")  # the quick preset's teacher run
    assert pick(student="resnet18", teacher="t.pt", amp="fp32", teacher_dtype="fp32", channels_last=False) == (
        "fp32",
        False,
        "fp32",
    )  # what is given wins
    assert pick(student="mnv2", teacher="t.pt", dataset="cifar100")[2] == "fp16"  # the official CIFAR-100 scripts
    cpu_bf16(False)
    assert pick(student="resnet18", teacher="t.pt") == ("fp32", True, "fp32")  # no native bf16: fp32


def test_the_self_trained_teacher_chooses_for_its_own_architecture(cpu_bf16):
    cpu_bf16(True)
    cfg = resolve(RunSettings(student="resnet18", device="cpu", threads=1))
    assert cfg.amp == "bf16" and cfg.teacher_run["student"] == "wrn34-10"
    assert cfg.teacher_run["amp"] == "fp32"  # WRN-34-10's training in bf16 is not measured here
    given = resolve(RunSettings(student="resnet18", device="cpu", threads=1, amp="fp32", channels_last=True))
    assert given.teacher_run["amp"] == "fp32" and given.teacher_run["channels_last"] is True


def test_the_choice_and_the_cpu_are_recorded(data, tmp_path):
    cfg = resolve(RunSettings(method="natural", data=str(data), **TINY))
    engine.train(cfg, tmp_path / "run", progress=False)
    saved = json.loads(RunDir(tmp_path / "run").config.read_text())
    assert saved["amp"] == cfg.amp and saved["fold_bn"] is True
    assert saved["versions"]["cpu"] == hardware.cpu_info()


# ---- each lever against the plain path (CPU, and the same on CUDA where a GPU is visible) ----------------


def _one_step(device: str, **given):
    """One RSLAD step from the same seed and batch; returns (loss, the student's state after it)."""
    s = RunSettings(
        method="rslad",
        student="resnet8",
        teacher="t.pt",
        teacher_arch="resnet8",
        device=device,
        threads=1,
        batch_size=16,
        fold_bn=False,
        channels_last=False,
        amp="fp32",
        teacher_dtype="fp32",
    )
    cfg = resolve(s.replace(**given))
    torch.manual_seed(3)
    teacher = random_teacher(cfg)
    parts = build_parts(cfg, torch.device(device), teacher, generator_seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (16,), generator=g).to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loss, _ = parts.step(x, y)
    return float(loss), {k: v.float().cpu() for k, v in parts.student.state_dict().items() if v.is_floating_point()}


# per-lever tolerances on the step's loss and the weights after it: fp32 levers are float rounding (a sign
# of the attack's gradient may flip where it is ~0); bf16 keeps ~3 significant digits
LEVERS = [
    ("channels_last", dict(channels_last=True), 1e-4, 1e-4),
    ("folded BatchNorm", dict(fold_bn=True), 1e-4, 1e-4),
    ("bf16 autocast", dict(amp="bf16"), 3e-2, 3e-3),
    ("bf16 teacher weights", dict(teacher_dtype="bf16"), 3e-2, 3e-3),
    ("all of them", dict(channels_last=True, fold_bn=True, amp="bf16", teacher_dtype="bf16"), 3e-2, 3e-3),
]


def _check_lever(device, given, loss_tol, weight_tol):
    base_loss, base = _one_step(device)
    loss, state = _one_step(device, **given)
    assert abs(loss - base_loss) <= loss_tol * abs(base_loss), (loss, base_loss)
    for k in base:
        torch.testing.assert_close(state[k], base[k], rtol=weight_tol, atol=weight_tol, msg=k)


@pytest.mark.parametrize("name, given, loss_tol, weight_tol", LEVERS, ids=[lv[0] for lv in LEVERS])
def test_each_lever_trains_as_the_plain_path_cpu(name, given, loss_tol, weight_tol):
    _check_lever("cpu", given, loss_tol, weight_tol)


@pytest.mark.cuda
@pytest.mark.parametrize("name, given, loss_tol, weight_tol", LEVERS, ids=[lv[0] for lv in LEVERS])
def test_each_lever_trains_as_the_plain_path_cuda(name, given, loss_tol, weight_tol):
    from rslad_fast.engine.precision import tf32

    with tf32(False):  # fp32 means fp32 (cuDNN's default would round the convolutions to TF32)
        _check_lever("cuda", given, loss_tol, weight_tol)
