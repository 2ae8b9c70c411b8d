"""A tiny, learnable fake CIFAR-10 (and CIFAR-100) written in the official python layouts, for the tests and the
GPU smoke run.

Why: tests must run without the real data (users run the suite without it) and in seconds on 2 CPU
cores. The files go through the very same reader as the real ones (``load_cifar10``), pickled the way
the official Python 2 files are (protocol 2, Python 2 ``str`` keys), so the reader's path is exercised.

Why learnable: each class is a distinct solid colour plus a class-specific stripe pattern, with mild
per-pixel noise, so a tiny model separates the classes in a few optimizer steps (and adversarial /
distillation code has a signal to work with), while every image is still unique (the noise), which the
augmentation tests rely on to recover crop offsets by matching.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

from rslad_fast.data.cifar import DATASETS, FOLDER, TEST_FILES, TRAIN_FILES

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Py2Str(str):
    """Pickled as Python 2 pickled ``str``: read back as bytes with encoding='bytes', like the official files."""


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj):
        b = obj.encode("latin1")
        op = pickle.SHORT_BINSTRING + bytes([len(b)]) if len(b) < 256 else pickle.BINSTRING + struct.pack("<i", len(b))
        self.write(op + b)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Pickler(f, protocol=2).dump(obj)


def fake_images(labels: np.ndarray, rng: np.random.Generator, noise: int = 24, num_classes: int = 10) -> np.ndarray:
    """uint8 [N, 3, 32, 32]: colour of the class + stripes (period and direction by class) + noise. With 100
    classes, class c has the colour of c % 10 and the stripes of c // 10: 100 distinct patterns."""
    n = len(labels)
    palette = np.array(
        [
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
            [128, 128, 128],
        ],
        dtype=np.float32,
    )
    yy, xx = np.mgrid[0:32, 0:32]
    img = np.empty((n, 3, 32, 32), np.float32)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        colour, pattern = (c, c) if num_classes == 10 else (c % 10, c // 10)
        period = 2 + pattern % 5
        coord = yy if pattern < 5 else xx
        stripes = ((coord // period) % 2).astype(np.float32) * 60.0 - 30.0  # +-30 brightness bands
        img[idx] = palette[colour][:, None, None] + stripes[None]
    img += rng.integers(-noise, noise + 1, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_fake_cifar10(root: str | os.PathLike, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; return that folder.

    Labels are balanced (``i % 10``, shuffled), the train set is split over the five batch files.
    Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    out = Path(root) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    k = _Py2Str
    for names, n in ((TRAIN_FILES, n_train), (TEST_FILES, n_test)):
        labels = rng.permutation(np.arange(n) % 10)
        data = fake_images(labels, rng).reshape(n, -1)
        for name, idx in zip(names, np.array_split(np.arange(n), len(names))):
            _dump(
                {
                    k("batch_label"): k(name),
                    k("labels"): labels[idx].tolist(),
                    k("data"): data[idx],
                    k("filenames"): [k(f"fake_{name}_{i}.png") for i in idx],
                },
                out / name,
            )
    _dump(
        {
            k("num_cases_per_batch"): -(-n_train // len(TRAIN_FILES)),
            k("label_names"): [k(c) for c in CLASSES],
            k("num_vis"): 3072,
        },
        out / "batches.meta",
    )
    return out


def write_fake_cifar100(root: str | os.PathLike, n_train: int = 400, n_test: int = 200, seed: int = 0) -> Path:
    """Write ``root/cifar-100-python/{train, test, meta}`` as the official CIFAR-100 files are written (one
    pickle per split with ``filenames``, ``batch_label``, ``fine_labels``, ``coarse_labels`` and ``data``;
    ``meta`` with the 100 ``fine_label_names`` and 20 ``coarse_label_names``); return that folder.

    Fine labels are balanced (``i % 100``, shuffled); the coarse label of fine class c is c // 5 here (the
    real grouping differs; nothing reads it). Deterministic in ``seed``."""
    spec = DATASETS["cifar100"]
    rng = np.random.default_rng(seed)
    out = Path(root) / spec.folder
    out.mkdir(parents=True, exist_ok=True)
    k = _Py2Str
    for name, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 100)
        _dump(
            {
                k("filenames"): [k(f"fake_{name}_{i}.png") for i in range(n)],
                k("batch_label"): k(f"{name}ing batch 1 of 1"),
                k("fine_labels"): labels.tolist(),
                k("coarse_labels"): (labels // 5).tolist(),
                k("data"): fake_images(labels, rng, num_classes=100).reshape(n, -1),
            },
            out / name,
        )
    _dump(
        {
            k("fine_label_names"): [k(f"class_{c:02d}") for c in range(100)],
            k("coarse_label_names"): [k(f"superclass_{c:02d}") for c in range(20)],
        },
        out / "meta",
    )
    return out
