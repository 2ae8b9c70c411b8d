"""What several test files share: a fake CIFAR-10 folder, a fake CIFAR-100 folder, a naturally trained tiny
teacher, one intra-op thread, a tiny model trained on given images, and the `cuda` mark's skip where no GPU
is visible."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fake_cifar import write_fake_cifar10, write_fake_cifar100

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # pyproject.toml's `cuda` mark: needs a GPU, skipped with a reason where none is visible. The hook sees
    # every collected item (benchmarks/ too, in a joint run): only this folder's are ours to mark.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if item.get_closest_marker("cuda") is not None and item.path.is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory):
    """``fake_cifar10(n_train, n_test, seed)``: a fresh folder holding the learnable fake CIFAR-10 of
    tests/fake_cifar.py, the root to pass as ``--data``."""

    def make(n_train, n_test, seed):
        root = tmp_path_factory.mktemp("cifar")
        write_fake_cifar10(root, n_train=n_train, n_test=n_test, seed=seed)
        return root

    return make


@pytest.fixture(scope="session")
def fake_cifar100(tmp_path_factory):
    """``fake_cifar100(n_train, n_test, seed)``: a fresh folder holding a fake CIFAR-100 in the official
    ``cifar-100-python/{train,test,meta}`` layout (tests/fake_cifar.py), the root to pass as ``--data``."""

    def make(n_train, n_test, seed):
        root = tmp_path_factory.mktemp("cifar100")
        write_fake_cifar100(root, n_train=n_train, n_test=n_test, seed=seed)
        return root

    return make


@pytest.fixture(scope="session")
def natural_teacher(tmp_path_factory):
    """``natural_teacher(data, *train_args)``: the last.pt (our own checkpoint format) of a natural run of
    ``train.main`` on ``data``, a teacher for the distillation runs."""

    def make(data, *train_args):
        from rslad_fast import train

        out = tmp_path_factory.mktemp("teacher") / "run"
        assert train.main(["--method", "natural", "--data", str(data), "--out", str(out), *train_args]) == 0
        return out / "last.pt"

    return make


@pytest.fixture(scope="session")
def train_tiny():
    """``train_tiny(x, y, steps, batch, lr)``: the tiny model (seed 0) after ``steps`` SGD steps of cross-entropy
    on seeded random batches of (x, y), and its optimizer."""

    def train(x, y, steps, batch, lr):
        from rslad_fast.models import build

        torch.manual_seed(0)
        model = build("tiny")
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(y), (batch,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, opt

    return train


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread until the module ends: the tests' ops are tiny, and on a shared 2-core machine a
    second thread mostly spin-waits (measured: ~9 s for test_evaluate.py with 1 thread, ~50 s with 2 under
    load). A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``, so that it is
    set before the module's other fixtures build their models."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
