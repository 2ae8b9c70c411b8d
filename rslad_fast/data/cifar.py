"""Reader for CIFAR-10 in the official python layout (``cifar-10-batches-py``).

Why our own reader and not ``torchvision.datasets.CIFAR10``: the training loop keeps the whole set as one
uint8 tensor (GPU-resident on CUDA), so we want ``[N, 3, 32, 32]`` uint8 straight from the files, with
clear one-line :class:`~rslad_fast.errors.UserError` messages instead of tracebacks. torchvision is used
only to download when the files are missing and the machine is online.

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
from pathlib import Path

import numpy as np
import torch

from rslad_fast.errors import UserError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_HOW = f"run `python ../shared/data/prepare_cifar10.py DIR` and pass DIR, or download {URL} and unpack it into DIR"

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


def _resolve(root: str | os.PathLike) -> Path:
    """The ``cifar-10-batches-py`` folder, whether ``root`` is its parent or the folder itself."""
    root = Path(root).expanduser()
    if root.name == FOLDER and not (root / FOLDER).is_dir():
        return root
    return root / FOLDER


def _get(d: dict, key: str):
    # encoding='bytes' gives bytes keys for the Python 2 str keys; files written by Python 3 may use str.
    if key.encode() in d:
        return d[key.encode()]
    return d[key]


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"CIFAR-10 batch file missing: {path}; {_HOW}")
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
        # Checked, never cast: a cast wraps float 1000 to 232 and -5 to 251, turns NaN into 0, uint16 into
        # its low byte and label 0.5 into 0, and the run trains on that without a word.
        data = np.asarray(_get(d, "data"))
        labels = np.asarray(_get(d, "labels"))
        if data.dtype != np.uint8:
            raise ValueError(f"pixels are {data.dtype}, expected uint8 (0..255)")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels are {labels.dtype}, expected integers 0..9")
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise ValueError(f"data {data.shape}, labels {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError("labels outside 0..9")
        labels = labels.astype(np.int64)
    except UserError:
        raise
    except Exception as e:  # pickle, EOF, key, shape errors: all mean an unusable file
        raise UserError(
            f"CIFAR-10 batch file is corrupt or not in the official format: {path} ({type(e).__name__}: {e}); {_HOW}"
        ) from None
    return data, labels


def _download(folder: Path, train: bool) -> None:
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(folder.parent), train=train, download=True)
    except Exception as e:
        raise UserError(
            f"CIFAR-10 not found at {folder} and the download failed ({type(e).__name__}: {e}); {_HOW}"
        ) from None


def load_cifar10(
    root: str | os.PathLike, train: bool, *, download: bool | str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the train (50k) or test (10k) split as ``(uint8 [N, 3, 32, 32], int64 [N])`` CPU tensors.

    ``root`` is the folder holding ``cifar-10-batches-py/`` or that folder itself. When it is missing:
    ``download="auto"`` downloads with torchvision if the host answers within 3 s, else raises
    :class:`UserError` saying how to get the data; ``True`` always tries; ``False`` never does.
    """
    folder = _resolve(root)
    if not folder.is_dir():
        if download is True or (download == "auto" and _online()):
            _download(folder, train)
        else:
            why = "offline, no download possible" if download == "auto" else "download disabled"
            raise UserError(f"CIFAR-10 not found at {folder} ({why}); {_HOW}")
    parts = [_read_batch(folder / name) for name in (TRAIN_FILES if train else TEST_FILES)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))  # R, G, B planes, each row-major
    return images, torch.from_numpy(labels)
