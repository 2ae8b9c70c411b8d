"""Data layer: CIFAR reader, synthetic set, crop/flip augmentation, TensorLoader. Tiny and CPU-only."""

import pickle
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from crop_flip import CHI2_DF8_P001, chi2_uniform, infer_crop_flip_params
from fake_cifar import write_fake_cifar10

from rslad_fast.data import (
    TensorLoader,
    apply_crop_flip,
    cifar,
    epoch_indices,
    load_cifar10,
    make_loader,
    random_crop_flip,
    sample_crop_flip_params,
)
from rslad_fast.errors import UserError


@pytest.fixture(scope="module")
def fake(fake_cifar10):
    return fake_cifar10(n_train=50, n_test=20, seed=0)


# ---- reader ---------------------------------------------------------------------------------------------


def test_reader_round_trip_both_root_forms(fake):
    x, y = load_cifar10(fake, train=True)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (50,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    x2, y2 = load_cifar10(fake / "cifar-10-batches-py", train=True)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xt, yt = load_cifar10(str(fake), train=False)
    assert xt.shape == (20, 3, 32, 32) and yt.shape == (20,)
    # Same pixels and labels as a plain latin1 unpickling of the files (our own temp files: trusted).
    folder = fake / "cifar-10-batches-py"
    raw = [pickle.loads((folder / f"data_batch_{i}").read_bytes(), encoding="latin1") for i in range(1, 6)]
    assert torch.equal(x, torch.from_numpy(np.concatenate([r["data"] for r in raw]).reshape(-1, 3, 32, 32)))
    assert y.tolist() == sum((r["labels"] for r in raw), [])


def test_reader_accepts_numpy1_pickles(tmp_path):
    folder = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    f = folder / "test_batch"
    raw = f.read_bytes()
    assert b"numpy._core.multiarray\n" in raw
    # The official (numpy 1 era) files name the reconstructor numpy.core.multiarray._reconstruct.
    f.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    x, y = load_cifar10(tmp_path, train=False)
    assert x.shape == (10, 3, 32, 32)


def test_missing_folder_offline_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "_online", lambda *a, **k: False)
    with pytest.raises(UserError) as e:
        load_cifar10(tmp_path / "nowhere", train=True)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg
    assert "prepare_cifar10.py" in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(UserError):
        load_cifar10(tmp_path / "nowhere", train=True, download=False)


def test_missing_folder_online_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "_online", lambda *a, **k: True)
    calls = []

    def fake_download(folder, train):  # stands in for torchvision's download
        calls.append(folder)
        write_fake_cifar10(folder.parent, n_train=10, n_test=10)

    monkeypatch.setattr(cifar, "_download", fake_download)
    x, _ = load_cifar10(tmp_path / "cifar-10-batches-py", train=False)
    assert calls == [tmp_path / "cifar-10-batches-py"] and x.shape[0] == 10


def test_online_check_does_not_hang(monkeypatch):
    monkeypatch.setattr(cifar.socket, "create_connection", lambda *a, **k: time.sleep(2))
    t = time.monotonic()
    assert cifar._online(timeout=0.2) is False
    assert time.monotonic() - t < 1.0


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage", "evil", "shape"])
def test_corrupt_batch_is_user_error(tmp_path, damage):
    folder = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    f = folder / "data_batch_3"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "delete":
        f.unlink()
    elif damage == "garbage":
        f.write_bytes(b"not a pickle at all")
    elif damage == "evil":  # a pickle that would run code if loaded with plain pickle.load

        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))

        f.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    else:
        f.write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(UserError, match="data_batch_3"):
        load_cifar10(tmp_path, train=True)
    load_cifar10(tmp_path, train=False)  # the other split is unaffected


def _rewrite(folder, name, data=None, labels=None):
    """Rewrite one batch file with other pixels or labels (a Python 3 pickle, our own temp file: trusted)."""
    f = folder / name
    d = pickle.loads(f.read_bytes(), encoding="bytes")
    if data is not None:
        d[b"data"] = data
    if labels is not None:
        d[b"labels"] = labels
    f.write_bytes(pickle.dumps(d, protocol=2))
    return d


@pytest.mark.parametrize(
    "bad",
    [
        "float_nan",
        "float_1000",
        "float_minus5",
        "float_in_range",
        "uint16",
        "int64",
        "labels_float",
        "labels_whole_floats",
        "labels_bool",
        "labels_10",
        "labels_minus1",
    ],
)
def test_reader_requires_uint8_pixels_and_integer_labels_in_range(tmp_path, bad):
    """Casting would silently wrap 1000 to 232, -5 to 251, NaN to 0 and 0.5 to label 0: refuse instead."""
    folder = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    d = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    data, labels = d[b"data"], list(d[b"labels"])
    if bad.startswith("float"):
        data = data.astype(np.float64)
        data[0, 0] = {"float_nan": np.nan, "float_1000": 1000.0, "float_minus5": -5.0, "float_in_range": 7.0}[bad]
        _rewrite(folder, "test_batch", data=data)
    elif bad in ("uint16", "int64"):
        _rewrite(folder, "test_batch", data=data.astype(bad))
    elif bad == "labels_float":
        _rewrite(folder, "test_batch", labels=[0.5] + labels[1:])
    elif bad == "labels_whole_floats":
        _rewrite(folder, "test_batch", labels=[float(v) for v in labels])
    elif bad == "labels_bool":
        _rewrite(folder, "test_batch", labels=[True] * len(labels))
    else:
        _rewrite(folder, "test_batch", labels=[10 if bad == "labels_10" else -1] + labels[1:])
    with pytest.raises(UserError) as err:
        load_cifar10(tmp_path, train=False)
    msg = str(err.value)
    assert "test_batch" in msg and "\n" not in msg
    assert ("uint8" in msg) if "labels" not in bad else ("labels" in msg)


def test_reader_accepts_integer_label_arrays(tmp_path):
    """Labels as a numpy integer array (any integer dtype) are integers too; a Python list is the official form."""
    folder = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    d = _rewrite(folder, "test_batch")
    _rewrite(folder, "test_batch", labels=np.asarray(d[b"labels"], dtype=np.uint8))
    x, y = load_cifar10(tmp_path, train=False)
    assert y.dtype == torch.int64 and y.tolist() == list(d[b"labels"]) and x.dtype == torch.uint8


def test_synthetic_is_learnable(fake):
    """Class means are far apart relative to within-class spread: a linear model separates them."""
    x, y = load_cifar10(fake, train=True)
    feats = x.float().flatten(1)
    means = torch.stack([feats[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats, means).argmin(1)
    assert (pred == y).float().mean() == 1.0


# ---- augmentation ---------------------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_augment_shape_dtype_determinism():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=_gen(1))
    a = random_crop_flip(x, _gen(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, random_crop_flip(x, _gen(0)))
    assert not torch.equal(a, random_crop_flip(x, _gen(1)))


def test_offsets_uniform_and_flip_rate():
    p = sample_crop_flip_params(9000, _gen(0), padding=4)
    for v in (p.top, p.left):
        assert v.min() == 0 and v.max() == 8
        assert chi2_uniform(v, 9) < CHI2_DF8_P001
    assert abs(p.flip.float().mean().item() - 0.5) < 0.03


def test_crop_content_is_the_right_window():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=_gen(2))
    p = sample_crop_flip_params(32, _gen(3), padding=4)
    out = apply_crop_flip(x, p)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(32):
        t, l = int(p.top[i]), int(p.left[i])
        want = padded[i, :, t : t + 32, l : l + 32]
        assert torch.equal(out[i], want.flip(-1) if p.flip[i] else want)
    q = infer_crop_flip_params(out, x)  # and the matcher used by the DALI tests recovers the draws
    assert torch.equal(q.top, p.top) and torch.equal(q.left, p.left) and torch.equal(q.flip, p.flip)


# ---- loader ---------------------------------------------------------------------------------------------


def _indexed(n):
    """Image i is the constant i, so a batch tells which samples it holds."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous(), torch.arange(n) % 10


def _ids(x):
    return (x[:, 0, 16, 16] * 255).round().long()


def test_epoch_covers_dataset_once():
    x, y = _indexed(50)
    dl = TensorLoader(x, y, 16, train=True, device="cpu", seed=0, augment=False)
    batches = list(dl)
    assert len(dl) == len(batches) == 4 and [len(b[1]) for b in batches] == [16, 16, 16, 2]
    ids = torch.cat([_ids(b[0]) for b in batches])
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))
    assert torch.equal(torch.cat([b[1] for b in batches]), y[ids])
    assert len(TensorLoader(x, y, 16, train=True, device="cpu", seed=0, drop_last=True)) == 3


def test_values_range_and_types():
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=_gen(0))
    for train in (True, False):
        for xb, yb in TensorLoader(x, torch.arange(40) % 10, 16, train=train, device="cpu", seed=0):
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape[1:] == (3, 32, 32)
            assert 0.0 <= xb.min() and xb.max() <= 1.0


def test_eval_keeps_order_and_pixels():
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=_gen(0))
    xb = torch.cat([b[0] for b in TensorLoader(x, torch.zeros(20, dtype=torch.long), 8, train=False, seed=5)])
    assert torch.equal(xb, x.float() / 255)


def test_deterministic_and_resumable_per_epoch():
    x = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=_gen(0))
    y = torch.arange(30) % 10

    def run(epochs, seed=0):
        dl = TensorLoader(x, y, 8, train=True, device="cpu", seed=seed)
        out = None
        for e in epochs:
            dl.set_epoch(e)
            out = [b[0] for b in dl]
        return torch.cat(out)

    assert torch.equal(run([0, 1, 2, 3]), run([3]))  # resumed at epoch 3 = uninterrupted
    assert not torch.equal(run([3]), run([4]))
    assert not torch.equal(run([3]), run([3], seed=1))


def test_two_rank_shards_disjoint_and_complete():
    x, y = _indexed(50)
    shards = []
    for rank in range(2):
        dl = TensorLoader(x, y, 7, train=True, device="cpu", seed=3, rank=rank, world_size=2, augment=False)
        dl.set_epoch(2)
        shards.append(torch.cat([_ids(b[0]) for b in dl]).tolist())
    assert len(shards[0]) == len(shards[1]) == 25
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(50))
    # Odd size: padded by wrapping, same sample count on both ranks, all covered.
    a, b = (epoch_indices(51, epoch=0, seed=0, shuffle=True, rank=r, world_size=2).tolist() for r in range(2))
    assert len(a) == len(b) == 26 and set(a) | set(b) == set(range(51))


def test_make_loader_kinds(monkeypatch):
    x, y = _indexed(10)
    assert isinstance(make_loader("torch", x, y, 4, train=True, device="cpu"), TensorLoader)
    with pytest.raises(UserError, match="unknown loader"):
        make_loader("tf.data", x, y, 4, train=True)
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)  # DALI not importable
    with pytest.raises(UserError, match="pip install nvidia-dali-cuda130"):
        make_loader("dali", x, y, 4, train=True, device="cpu")
