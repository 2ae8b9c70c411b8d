"""Readers for CIFAR-10 and CIFAR-100 in the official python layouts (``cifar-10-batches-py/`` and
``cifar-100-python/``).

Why our own reader and not ``torchvision.datasets.CIFAR10``: the training loop keeps the whole set as one
uint8 tensor (GPU-resident on CUDA), so we want ``[N, 3, 32, 32]`` uint8 straight from the files, with
clear one-line :class:`~rslad_fast.errors.UserError` messages instead of tracebacks. torchvision is used
only to download when the files are missing and the machine is online (the official RSLAD scripts read both
sets with torchvision's ``CIFAR10`` / ``CIFAR100``, which read these very files).

The layouts (what torchvision's readers expect): CIFAR-10 has ``data_batch_1..5`` and ``test_batch`` with
``labels`` (0..9); CIFAR-100 has ``train``, ``test`` and ``meta``, the images' class in ``fine_labels``
(0..99; ``coarse_labels`` are its 20 superclasses, unused) and the 100 class names in ``meta``'s
``fine_label_names``. A folder of the one set given as the other is refused with a message saying which
set it holds.

Safety: the batch files are Python pickles (dicts of numpy arrays and lists, written by Python 2). Plain
``pickle.load`` can run arbitrary code from a malicious file, so we unpickle with an allow-list that only
resolves the few globals these files need (numpy's array/dtype reconstructors and ``_codecs.encode``);
anything else is rejected as a corrupt file. Still: only read data from sources you trust.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rslad_fast.errors import UserError


@dataclass(frozen=True)
class DataSet:
    """One of the readable data sets: its official python layout and class count."""

    name: str  # --dataset
    title: str
    folder: str
    train_files: tuple
    test_files: tuple
    label_key: str  # the images' class in each file
    num_classes: int
    url: str
    meta: Optional[str] = None  # a file that must hold `meta_key` with num_classes names (CIFAR-100)
    meta_key: Optional[str] = None

    @property
    def how(self) -> str:
        prepare = (
            "run `python ../shared/data/prepare_cifar10.py DIR` and pass DIR, or " if self.name == "cifar10" else ""
        )
        return f"{prepare}download {self.url} and unpack it into DIR (online, a missing folder is downloaded)"


DATASETS = {
    "cifar10": DataSet(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": DataSet(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        meta="meta",
        meta_key="fine_label_names",
    ),
}
NAMES = tuple(DATASETS)
CIFAR10 = DATASETS["cifar10"]
# the CIFAR-10 names, as before CIFAR-100 existed here
FOLDER, TRAIN_FILES, TEST_FILES, URL = CIFAR10.folder, CIFAR10.train_files, CIFAR10.test_files, CIFAR10.url


def get(name: str) -> DataSet:
    """The data set called ``name`` (``--dataset``); UserError for any other."""
    spec = DATASETS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise UserError(f"unknown data set {name!r}; choose one of: {', '.join(NAMES)}")
    return spec


def num_classes(name: str) -> int:
    """The class count of the data set called ``name``: what every model of a run on it outputs."""
    return get(name).num_classes


# (module, name) pairs the official (and prepare_cifar10.py) pickles reference; nothing else resolves.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":  # Python 2 / numpy 1 name; numpy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _online(host: str = "www.cs.toronto.edu", port: int = 443, timeout: float = 3.0) -> bool:
    """True if a TCP connection to the CIFAR host opens within ``timeout`` s (DNS included).

    Runs in a daemon thread so a hanging resolver cannot block us past the timeout.
    """
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except Exception:  # any failure (DNS, refused, timeout) means: no download possible
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _resolve(root: str | os.PathLike, spec: DataSet = CIFAR10) -> Path:
    """The data set's folder (``cifar-10-batches-py`` or ``cifar-100-python``), whether ``root`` is its parent
    or the folder itself."""
    root = Path(root).expanduser()
    if root.name == spec.folder and not (root / spec.folder).is_dir():
        return root
    return root / spec.folder


def _get(d: dict, key: str):
    # encoding='bytes' gives bytes keys for the Python 2 str keys; files written by Python 3 may use str.
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(f"no {key!r} entry")


def _unpickle(path: Path):
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="bytes").load()


def _corrupt(spec: DataSet, path: Path, e: Exception) -> UserError:
    return UserError(
        f"{spec.title} file is corrupt or not in the official format: {path} ({type(e).__name__}: {e}); {spec.how}"
    )


def _read_batch(path: Path, spec: DataSet = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{spec.title} batch file missing: {path}; {spec.how}")
    top = spec.num_classes - 1
    try:
        d = _unpickle(path)
        # Checked, never cast: a cast wraps float 1000 to 232 and -5 to 251, turns NaN into 0, uint16 into
        # its low byte and label 0.5 into 0, and the run trains on that without a word.
        data = np.asarray(_get(d, "data"))
        labels = np.asarray(_get(d, spec.label_key))
        if data.dtype != np.uint8:
            raise ValueError(f"pixels are {data.dtype}, expected uint8 (0..255)")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels are {labels.dtype}, expected integers 0..{top}")
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise ValueError(f"data {data.shape}, labels {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > top):
            raise ValueError(f"labels outside 0..{top}")
        labels = labels.astype(np.int64)
    except UserError:
        raise
    except Exception as e:  # pickle, EOF, key, shape errors: all mean an unusable file
        raise _corrupt(spec, path, e) from None
    return data, labels


def _check_meta(folder: Path, spec: DataSet) -> None:
    """CIFAR-100's ``meta`` names its 100 fine classes: the file that tells the set apart from any other
    folder of ``train``/``test`` pickles (torchvision's CIFAR100 reads it too)."""
    path = folder / spec.meta
    if not path.is_file():
        raise UserError(f"{spec.title} file missing: {path} (the class names, part of the official layout); {spec.how}")
    try:
        names = list(_get(_unpickle(path), spec.meta_key))
        if len(names) != spec.num_classes:
            raise ValueError(f"{len(names)} {spec.meta_key}, expected {spec.num_classes}")
    except Exception as e:
        raise _corrupt(spec, path, e) from None


def _other_set(root: Path, folder: Path, spec: DataSet) -> Optional[str]:
    """Why ``folder`` (missing, or without the set's files) looks like another data set's, in words, or None."""
    for other in DATASETS.values():
        if other is spec:
            continue
        files = other.train_files + other.test_files
        for where in (root, root / other.folder, folder):
            if where.is_dir() and all((where / f).is_file() for f in files):
                return f"{where} holds {other.title} ({', '.join(files[:2])}...); pass --dataset {other.name} for it"
    return None


def _download(folder: Path, train: bool) -> None:
    spec = next((d for d in DATASETS.values() if d.folder == folder.name), CIFAR10)
    try:
        import torchvision

        reader = torchvision.datasets.CIFAR100 if spec.name == "cifar100" else torchvision.datasets.CIFAR10
        reader(str(folder.parent), train=train, download=True)
    except Exception as e:
        raise UserError(
            f"{spec.title} not found at {folder} and the download failed ({type(e).__name__}: {e}); {spec.how}"
        ) from None


def load_cifar(
    root: str | os.PathLike, train: bool, *, dataset: str = "cifar10", download: bool | str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the train (50k) or test (10k) split of ``dataset`` (``cifar10`` or ``cifar100``) as
    ``(uint8 [N, 3, 32, 32], int64 [N])`` CPU tensors, labels in 0..C-1 (CIFAR-100: the fine labels).

    ``root`` is the folder holding the set's folder (``cifar-10-batches-py/``, ``cifar-100-python/``) or
    that folder itself. When it is missing: ``download="auto"`` downloads with torchvision if the host
    answers within 3 s, else raises :class:`UserError` saying how to get the data; ``True`` always tries;
    ``False`` never does. The other data set's folder where this one's should be is a UserError saying so
    (never downloaded into)."""
    spec = get(dataset)
    root = Path(root).expanduser()
    folder = _resolve(root, spec)
    names = spec.train_files if train else spec.test_files
    if not folder.is_dir():
        other = _other_set(root, folder, spec)
        inside_other = root.name in {d.folder for d in DATASETS.values()}  # never download into it
        online = download is True or (download == "auto" and _online())
        if other is not None and (inside_other or not online):
            raise UserError(f"{spec.title} not found at {folder}: {other}, or {spec.how}")
        if online:
            _download(folder, train)
        else:
            why = "offline, no download possible" if download == "auto" else "download disabled"
            raise UserError(f"{spec.title} not found at {folder} ({why}); {spec.how}")
    elif not any((folder / name).is_file() for name in names):
        other = _other_set(root, folder, spec)
        if other is not None:
            raise UserError(f"{folder} is not {spec.title}'s official layout: {other}")
    if spec.meta is not None:
        _check_meta(folder, spec)
    parts = [_read_batch(folder / name, spec) for name in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))  # R, G, B planes, each row-major
    return images, torch.from_numpy(labels)


def load_cifar10(
    root: str | os.PathLike, train: bool, *, download: bool | str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_cifar` of CIFAR-10."""
    return load_cifar(root, train, dataset="cifar10", download=download)


def load_cifar100(
    root: str | os.PathLike, train: bool, *, download: bool | str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_cifar` of CIFAR-100 (the fine labels, 0..99)."""
    return load_cifar(root, train, dataset="cifar100", download=download)
