"""``python -m rslad_fast.export``: every student architecture on both data sets exported to every format and
verified (ONNX Runtime, TorchScript, the torch.export program) on generated weights and a few generated images;
a deliberately broken export (a wrong input normalization, a wrong BatchNorm fold) caught by the verification;
a fixed batch; the metadata; bad input as one line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fake_cifar import CLASSES

import rslad_fast.export as export_package
from rslad_fast.export import ATOL, METADATA, ExportSettings, VerificationError, export, formats
from rslad_fast.export import cli as export_cli
from rslad_fast.models import build
from rslad_fast.models.wrn_dm import CIFAR10_MEAN, CIFAR10_STD, NORMALIZATIONS, DMWideResNet

pytestmark = pytest.mark.usefixtures("one_thread")
N = 6  # test images of each verification: a few, on a 2-core CPU


@pytest.fixture(scope="module")
def c10(fake_cifar10):
    return fake_cifar10(10, 20, 0)


@pytest.fixture(scope="module")
def c100(fake_cifar100):
    return fake_cifar100(100, 20, 0)


def _weights(arch: str, classes: int, seed: int = 0) -> dict:
    """A state dict of ``arch`` whose BatchNorms are not the identity (random affine and running statistics,
    so that folding them changes every conv), its logits of a few units."""
    torch.manual_seed(seed)
    model = build(arch, classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(30.0)  # logits of a few units, as a trained model's (fresh ones are ~0.1)
        head.bias.mul_(30.0)
    return model.state_dict()


def _run(tmp_path, arch: str, dataset: str, data, name: str = "run", ckpts=("best.pt",)):
    run = tmp_path / name
    run.mkdir()
    config = {"student": arch, "dataset": dataset, "data": str(data), "wrn70_16_norm": "cifar10"}
    (run / "config.json").write_text(json.dumps(config))
    classes = 10 if dataset == "cifar10" else 100
    for c in ckpts:
        torch.save({"model": _weights(arch, classes), "epoch": 2}, run / c)
    return run


def _check_metadata(result, arch, dataset, classes, names, all_fold=True):
    meta = json.loads((result.out / METADATA).read_text())
    assert meta == result.metadata
    assert (meta["architecture"], meta["dataset"], meta["num_classes"]) == (arch, dataset, classes)
    assert len(meta["class_names"]) == classes
    assert meta["input"]["range"] == [0.0, 1.0] and meta["tolerance"]["max_abs_logit_diff"] == ATOL
    assert sorted(meta["formats"]) == sorted(names)
    for name in names:
        assert (result.out / meta["formats"][name]["file"]).is_file()
        for what, f in meta["verification"]["per_format"][name].items():
            assert f["ok"] and f["max_abs_logit_diff"] <= ATOL, (name, what, f)
            assert f["agree"] + f["ties"] == f["n"]
        assert meta["verification"]["per_format"][name]["clean"]["n"] == N
        assert meta["verification"]["per_format"][name]["PGD-20"]["n"] == N
    folded = meta["verification"]["bn_folded"]
    assert folded["folded"] > 0 and (folded["folded"] == folded["total"]) == all_fold  # models/fold.py's table
    return meta


@pytest.mark.parametrize(
    "arch,dataset", [("resnet18", "cifar10"), ("mnv2", "cifar10"), ("resnet18", "cifar100"), ("mnv2", "cifar100")]
)
def test_every_student_exports_and_verifies_on_both_data_sets(tmp_path, c10, c100, arch, dataset):
    data = c10 if dataset == "cifar10" else c100
    run = _run(tmp_path, arch, dataset, data)
    lines = []
    result = export(ExportSettings(run=str(run), n=N), log=lines.append)
    classes = 10 if dataset == "cifar10" else 100
    meta = _check_metadata(result, arch, dataset, classes, list(formats.NAMES))
    assert meta["batch"] == "dynamic" and meta["epoch"] == 2
    assert result.out == run / "export" / "best"
    assert sorted(p.name for p in result.out.iterdir()) == sorted(
        [METADATA, "model.onnx", "model.torchscript.pt", "model.pt2"]
    )
    assert [p.name for p in run.joinpath("export").iterdir()] == ["best"]  # no temporary left
    if dataset == "cifar10":
        assert meta["class_names"] == CLASSES
    assert len(lines) == 1 + len(formats.NAMES) and all("batch-1 1/1 agree" in line for line in lines[1:])

    # the artifact, run here by its own runtime, gives the PyTorch model's predictions on fresh images
    import onnxruntime as ort

    model = build(arch, classes)
    model.load_state_dict(_weights(arch, classes))
    x = torch.rand(5, 3, 32, 32)
    session = ort.InferenceSession(str(result.files["onnx"]), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = model.eval()(x)
    assert (got - want).abs().max() <= ATOL
    program = torch.export.load(str(result.files["exported"])).module()
    assert (program(x) - want).abs().max() <= ATOL


def test_the_other_architectures_export(tmp_path, c10):
    """resnet8 and the tiny CNN (the larger teachers, wrn34-10 and wrn70-16, go the same way but are too big
    for this CPU's suite)."""
    for arch in ("resnet8", "tiny"):
        run = _run(tmp_path, arch, "cifar10", c10, name=arch)
        result = export(ExportSettings(run=str(run), n=N, formats=["onnx", "exported"]), log=lambda _: None)
        _check_metadata(result, arch, "cifar10", 10, ["onnx", "exported"])


def test_a_model_that_normalizes_inside_carries_its_normalization(tmp_path, c100, monkeypatch):
    """WRN-70-16's path (its mean/std buffers inside forward), on a depth-10 width-1 model of its layout (the
    real one, 267M parameters, is too big for this CPU's suite): the artifacts take [0, 1] images, verify, and
    metadata.json gives the run's normalization (here CIFAR-100's) as applied inside the model."""

    def small(name, num_classes=10, *, normalization="cifar10"):
        mean, std = NORMALIZATIONS[normalization]
        return DMWideResNet(num_classes, depth=10, width=1, mean=mean, std=std)

    monkeypatch.setattr(export_package, "build", small)
    run = tmp_path / "run"
    run.mkdir()
    config = {"student": "wrn70-16", "dataset": "cifar100", "data": str(c100), "wrn70_16_norm": "cifar100"}
    (run / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    torch.save({"model": small("wrn70-16", 100).state_dict()}, run / "best.pt")
    result = export(ExportSettings(run=str(run), n=N, formats=["onnx", "exported"]), log=lambda _: None)
    meta = _check_metadata(result, "wrn70-16", "cifar100", 100, ["onnx", "exported"], all_fold=False)
    norm = meta["input"]["normalization"]
    assert norm["where"] == "inside the model" and norm["mean"] == pytest.approx(list(NORMALIZATIONS["cifar100"][0]))
    assert norm["std"] == pytest.approx(list(NORMALIZATIONS["cifar100"][1]))
    assert meta["epoch"] is None and meta["eval"] is None


def test_a_fixed_batch(tmp_path, c10):
    """--batch 4 on 6 images: the last chunk padded; ONNX's input is [4, 3, 32, 32]; the .pt2 and the
    TorchScript module refuse 3 images and still take 4."""
    import onnxruntime as ort

    run = _run(tmp_path, "tiny", "cifar10", c10)
    result = export(ExportSettings(run=str(run), n=N, batch=4), log=lambda _: None)
    meta = _check_metadata(result, "tiny", "cifar10", 10, list(formats.NAMES))
    assert meta["batch"] == 4 and meta["input"]["shape"] == [4, 3, 32, 32]
    assert "batch-1" not in meta["verification"]["per_format"]["onnx"]
    session = ort.InferenceSession(str(result.files["onnx"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [4, 3, 32, 32]
    with pytest.raises(AssertionError, match="Guard failed"):
        torch.export.load(str(result.files["exported"])).module()(torch.rand(3, 3, 32, 32))
    scripted = torch.jit.load(str(result.files["torchscript"]))
    with pytest.raises(torch.jit.Error, match="fixed batch of 4 images, got 3"):
        scripted(torch.rand(3, 3, 32, 32))
    assert scripted(torch.rand(4, 3, 32, 32)).shape == (4, 10)
    assert meta["formats"]["torchscript"]["method"] == "torch.jit.trace in a scripted fixed-batch guard"


def test_the_eval_json_row_of_the_checkpoint(tmp_path, c10):
    run = _run(tmp_path, "tiny", "cifar10", c10, ckpts=("best.pt", "last.pt"))
    rows = [
        {"label": c, "checkpoint": str(run / f"{c}.pt"), "accuracy": {"clean": i}}
        for i, c in enumerate(("best", "last"))
    ]
    (run / "eval.json").write_text(json.dumps({"rows": rows, "n": 20, "dataset": "cifar10"}))
    meta = export(ExportSettings(run=str(run), ckpt="last", n=N, formats=["exported"]), log=lambda _: None).metadata
    assert meta["eval"]["row"] == rows[1] and meta["eval"]["n"] == 20 and meta["eval_note"] is None
    assert meta["checkpoint"] == str(run / "last.pt")
    (run / "eval.json").unlink()
    meta = export(ExportSettings(run=str(run), n=N, formats=["exported"]), log=lambda _: None).metadata
    assert meta["eval"] is None and "no evaluation recorded" in meta["eval_note"]


def _wrong_normalization(model, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
    return formats.InputNormalization(model, CIFAR10_MEAN, CIFAR10_STD).eval()  # a model that never saw it


def _wrong_fold(model):
    folded = build("tiny")
    folded.load_state_dict(model.state_dict())
    folded.bn1.running_var.mul_(1.01)  # one BatchNorm folded with its variance 1% off
    return folded.eval()


@pytest.mark.parametrize(
    "where,broken,fmt",
    [
        ("in_graph", _wrong_normalization, "onnx"),
        ("in_graph", _wrong_normalization, "exported"),
        ("in_graph", _wrong_normalization, "torchscript"),
        ("fold_bn", _wrong_fold, "onnx"),
    ],
)
def test_a_broken_export_is_caught(tmp_path, c10, capsys, monkeypatch, where, broken, fmt):
    """The artifact is made from a wrongly built model: the verification fails, the command says so in one
    line with status 1, and nothing is written (a previous export stays as it was)."""
    run = _run(tmp_path, "tiny", "cifar10", c10)
    out = tmp_path / "out"
    good = export(ExportSettings(run=str(run), n=N, formats=[fmt], out=str(out)), log=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(formats if where == "in_graph" else export_package, where, broken)
    with pytest.raises(VerificationError, match=f"verification failed: {fmt} on {N} clean images: max"):
        export(ExportSettings(run=str(run), n=N, formats=[fmt], out=str(out)), log=lambda _: None)
    capsys.readouterr()
    rc = export_cli.main(["--run", str(run), "--n", str(N), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err
    assert (
        rc == 1 and err.count("\n") == 1 and err.startswith("error: verification failed") and "nothing written" in err
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and good.out == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporary left


def _one_line(capsys, argv, *expected):
    capsys.readouterr()
    try:
        rc = export_cli.main(argv)
    except SystemExit as e:  # a flag argparse refuses (the same one line, see cli.Parser)
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    for e in expected:
        assert e in captured.err, captured.err
    return captured.err


def test_bad_input_is_one_line(tmp_path, c10, capsys, monkeypatch):
    run = _run(tmp_path, "tiny", "cifar10", c10, ckpts=())
    _one_line(capsys, ["--run", str(run)], "no best.pt", "no checkpoint yet")
    torch.save({"model": _weights("tiny", 10), "epoch": 1}, run / "last.pt")
    _one_line(capsys, ["--run", str(run)], "no best.pt", "--ckpt last")
    _one_line(capsys, ["--run", str(tmp_path / "nowhere")], "no such directory")
    _one_line(capsys, ["--run", str(run), "--ckpt", "last", "--format", "onnx,tflite"], "unknown format", "tflite")
    (tmp_path / "a_file").write_text("x")
    _one_line(capsys, ["--run", str(run), "--ckpt", "last", "--out", str(tmp_path / "a_file" / "x")], "is a file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    _one_line(capsys, ["--run", str(run), "--ckpt", "last", "--out", str(tmp_path / "full")], "not an export")
    _one_line(capsys, ["--run", str(run), "--ckpt", "last", "--n", "21"], "exceeds the 20 test images")
    _one_line(capsys, ["--run", str(tmp_path / "a_file")], "not a directory")
    _one_line(capsys, ["--run", str(run), "--ckpt", "last", "--data", str(tmp_path / "moved")], "not found", "(--data)")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "moved")}))
    _one_line(capsys, ["--run", str(run), "--ckpt", "last"], "not found", "config.json names; pass --data DIR")
    (run / "config.json").write_text(json.dumps(config))
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "mkdir", read_only)  # a file system that turned read-only after the checks
    argv = [
        "--run",
        str(run),
        "--ckpt",
        "last",
        "--n",
        "2",
        "--format",
        "exported",
        "--out",
        str(tmp_path / "ro" / "x"),
    ]
    _one_line(capsys, argv, "Read-only file system")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "full", "run"]
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "last.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_out_folder_is_one_line(tmp_path, c10, capsys):
    run = _run(tmp_path, "tiny", "cifar10", c10)
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        _one_line(capsys, ["--run", str(run), "--out", str(parent / "x")], "not writable")
    finally:
        parent.chmod(0o700)


def test_the_cli_prints_the_verification_and_the_help_states_the_tolerance(tmp_path, c10, capsys):
    run = _run(tmp_path, "tiny", "cifar10", c10)
    assert (
        export_cli.main(["--run", str(run), "--n", str(N), "--format", "torchscript,onnx", "--batch", "dynamic"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PyTorch model (tiny, cifar10, best.pt) on the first 6 test images")
    assert [line.split()[0] for line in out[1:3]] == ["onnx", "torchscript"]
    assert out[-1].startswith("verified; wrote model.onnx, model.torchscript.pt and metadata.json")
    with pytest.raises(SystemExit):
        export_cli.main(["--help"])
    assert f"(default {ATOL:g})" in " ".join(capsys.readouterr().out.split())


def test_a_failed_final_rename_keeps_the_previous_export(tmp_path, c10, capsys, monkeypatch):
    """The last step (the new folder in the place of the old) failing: the previous export is put back whole."""
    import errno

    run = _run(tmp_path, "tiny", "cifar10", c10)
    out = tmp_path / "out"
    export(ExportSettings(run=str(run), n=N, formats=["exported"], out=str(out)), log=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    replace = os.replace

    def failing(src, dst):
        if os.path.basename(src).startswith(".out.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    _one_line(capsys, ["--run", str(run), "--n", str(N), "--format", "exported", "--out", str(out)], "No space left")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
