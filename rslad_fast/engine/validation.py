"""``--val-n N``: which images pick ``best.pt``, and the held-out validation split of the training set.

The official RSLAD script evaluates PGD-20 on the test set and saves each evaluated checkpoint under a name that
carries that test accuracy (zibojia/RSLAD resnet18_rslad_cifar10.py, the loop's last lines: `torch.save(...,
prefix + str(robust acc) + '.pth')`): the reader picks the best one by the test set. Our default keeps that
habit (the first ``eval_n`` test images pick ``best.pt``: ``"test-subset"``), for reproduction; the
robustness literature warns that it is selection on the test set (Rice et al., "Overfitting in adversarially
robust deep learning", ICML 2020, who hold out training images for it).

``--val-n N`` (``"validation"``) holds out N training images instead, never trained on, in any view (the
student's augmented batches, a self-trained teacher's, the teacher-logit cache, which indexes the training
images the loader is given), and evaluates them after every epoch; ``best.pt`` then follows their PGD-20. The
split is a function of the training set's size and N only (not of ``--seed``, the process count or the epoch),
so the same images are held out on resume and under torchrun: Rice et al.'s own rule
(locuslab/robust_overfitting generate_validation.py lines 5-9 and 23-26: ``np.random.seed(0)``, ``P =
np.random.permutation(50000)``, validation ``P[:n]``, training ``P[n:]``), so ``--val-n 1000`` on CIFAR-10
holds out exactly their 1,000 validation images. The training images that remain keep their file order, and
``--train-n`` takes the first of them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from rslad_fast.errors import UserError

# the validation permutation's seed: locuslab/robust_overfitting generate_validation.py line 5, np.random.seed(0)
SPLIT_SEED = 0
TEST_SUBSET = "test-subset"  # the default: the first eval_n test images pick best.pt (the official habit)
VALIDATION = "validation"  # --val-n N: N held-out training images pick best.pt
SELECTIONS = (TEST_SUBSET, VALIDATION)


def selection_of(val_n: Optional[int]) -> str:
    """The selection a run with ``val_n`` (None: not given) uses: config.json's ``best_selection``."""
    return TEST_SUBSET if val_n is None else VALIDATION


def val_indices(num_train: int, val_n: int) -> np.ndarray:
    """The held-out images' indices in the training file (int64, Rice et al.'s permutation order)."""
    return np.random.RandomState(SPLIT_SEED).permutation(num_train)[:val_n].astype(np.int64)


def split(train: tuple, val_n: Optional[int]) -> tuple:
    """(training images and labels, held-out images and labels) of a training set ``train`` (uint8 images, labels):
    ``val_n`` None keeps the whole set and holds out nothing (None in place of the held-out pair)."""
    images, labels = train
    if val_n is None:
        return train, None
    if val_n >= len(images):
        raise UserError(f"--val-n {val_n} leaves no training image of the {len(images)} there are")
    held = torch.from_numpy(val_indices(len(images), val_n))
    keep = torch.ones(len(images), dtype=torch.bool)
    keep[held] = False
    return (images[keep], labels[keep]), (images[held], labels[held])


def describe(config: dict) -> dict:
    """What picked a run's ``best.pt``, from its config.json (older runs: the test subset), as eval.json and the
    reproduce table record it: ``name`` (SELECTIONS), ``images`` (how many; None where unknown), ``text``."""
    val_n = config.get("val_n")
    if config.get("best_selection", selection_of(val_n)) == VALIDATION and isinstance(val_n, int):
        text = f"PGD-20 on {val_n} training images held out of training (--val-n)"
        return {"name": VALIDATION, "images": val_n, "text": text}
    eval_n = config.get("eval_n") if isinstance(config.get("eval_n"), int) else None
    first = f"the first {eval_n}" if eval_n is not None else "the first"
    text = f"PGD-20 on {first} test images: the official RSLAD script's selection, on the test set"
    return {"name": TEST_SUBSET, "images": eval_n, "text": text}


def short(selection: dict) -> str:
    """A :func:`describe` record in a table cell: ``test-subset (1000)``."""
    images = selection.get("images")
    return f"{selection['name']} ({images})" if images is not None else selection["name"]
