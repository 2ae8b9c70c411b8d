"""DALI loader on the CPU backend: shapes, order/sharding, and the crop/flip distribution vs. the torch loader."""

import pytest
import torch

pytest.importorskip("nvidia.dali")

from crop_flip import CHI2_DF8_P001, chi2_uniform, infer_crop_flip_params  # noqa: E402

from rslad_fast.data import TensorLoader, make_loader  # noqa: E402
from rslad_fast.data.dali import DaliLoader  # noqa: E402
from rslad_fast.errors import UserError  # noqa: E402


def _noise(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_shapes_dtypes_range_and_order():
    x, y = _noise(40), torch.arange(40) % 10
    dl = DaliLoader(x, y, 16, train=True, device="cpu", seed=0)
    dl.set_epoch(1)
    batches = list(dl)
    assert len(dl) == len(batches) == 3 and [b[1].shape[0] for b in batches] == [16, 16, 8]
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32) and yb.dtype == torch.int64
        assert 0.0 <= xb.min() and xb.max() <= 1.0
    ref = TensorLoader(x, y, 16, train=True, device="cpu", seed=0)
    ref.set_epoch(1)
    assert torch.equal(dl.indices(), ref.indices())  # same shuffle as the torch loader
    assert torch.equal(torch.cat([b[1] for b in batches]), y[dl.indices()])


def test_eval_is_plain_to_tensor():
    x = _noise(20)
    dl = make_loader("dali", x, torch.zeros(20, dtype=torch.long), 8, train=False, device="cpu")
    assert isinstance(dl, DaliLoader)
    xb = torch.cat([b[0] for b in dl])
    assert torch.allclose(xb, x.float() / 255, atol=1e-6)


def test_training_on_cpu_is_refused():
    with pytest.raises(UserError, match="CUDA"):
        make_loader("dali", _noise(4), torch.zeros(4, dtype=torch.long), 2, train=True, device="cpu")


def _draws(loader, x, epochs):
    tops, lefts, flips = [], [], []
    for e in epochs:
        loader.set_epoch(e)
        out = torch.cat([b[0] for b in loader])
        src = x[loader.indices().to(x.device)]
        p = infer_crop_flip_params((out * 255).round().to(torch.uint8), src)
        assert (p.top >= 0).all(), "every output must be a window of its padded source"
        tops.append(p.top), lefts.append(p.left), flips.append(p.flip)
    return torch.cat(tops), torch.cat(lefts), torch.cat(flips)


def test_crop_flip_distribution_matches_torch_loader():
    x, y = _noise(64), torch.arange(64) % 10
    epochs = range(40)  # 2560 draws per loader
    dali = _draws(DaliLoader(x, y, 64, train=True, device="cpu", seed=0), x, epochs)
    ref = _draws(TensorLoader(x, y, 64, train=True, device="cpu", seed=0), x, epochs)
    for name, (t, l, f) in (("dali", dali), ("torch", ref)):
        for v in (t, l):
            assert v.min() == 0 and v.max() == 8, name
            assert chi2_uniform(v, 9) < CHI2_DF8_P001, (name, torch.bincount(v, minlength=9))
        assert abs(f.float().mean().item() - 0.5) < 0.04, name
    # Two-sample check: offset histograms of DALI and torch agree (chi-square homogeneity, df=8).
    for a, b in ((dali[0], ref[0]), (dali[1], ref[1])):
        ca, cb = torch.bincount(a, minlength=9).double(), torch.bincount(b, minlength=9).double()
        e = (ca + cb) / 2
        assert float(((ca - e) ** 2 / e + (cb - e) ** 2 / e).sum()) < CHI2_DF8_P001


def test_shard_coverage_and_epoch_jumps():
    n = 50
    x, y = _noise(n), torch.arange(n)
    seen = []
    for rank in range(2):
        dl = DaliLoader(x, y, 8, train=True, device="cpu", seed=1, rank=rank, world_size=2)
        dl.set_epoch(3)
        seen.append(torch.cat([b[1] for b in dl]).tolist())
    assert len(seen[0]) == len(seen[1]) == 25
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(n))

    dl = DaliLoader(x, y, 8, train=True, device="cpu", seed=1)
    for e in (0, 1, 5, 5):  # sequential, then a jump, then a repeat: each must follow epoch_indices
        dl.set_epoch(e)
        assert torch.cat([b[1] for b in dl]).tolist() == dl.indices().tolist()
    dl.set_epoch(6)
    next(iter(dl))  # leave an epoch early
    dl.set_epoch(7)
    assert torch.cat([b[1] for b in dl]).tolist() == dl.indices().tolist()
    it = iter(dl)  # an abandoned iterator kept alive must not leave the stream out of step either
    next(it)
    assert torch.cat([b[1] for b in dl]).tolist() == dl.indices().tolist()
    del it


@pytest.mark.cuda
def test_gpu_pipeline_batches_arrive_without_a_host_sync():
    """Images and labels leave the GPU pipeline on the GPU: no blocking pageable copy per batch (torch's
    sync debug mode turns any synchronising torch call in the loop into an error)."""
    x, y = _noise(64), torch.arange(64) % 10
    dl = DaliLoader(x, y, 16, train=True, device="cuda", seed=0)
    dl.set_epoch(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(dl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(xb.is_cuda and yb.is_cuda and yb.dtype == torch.int64 for xb, yb in batches)
    assert torch.equal(torch.cat([b[1] for b in batches]).cpu(), y[dl.indices()])


def test_views_name_the_crop_and_flip_of_each_image():
    """with_views: the pipeline's own draws, as view ids, reproduce every image from its original
    (apply_crop_flip of the decoded view), and asking for them changes no image."""
    from rslad_fast.data import apply_crop_flip, decode_views

    x, y = _noise(48, seed=3), torch.arange(48) % 10
    plain = DaliLoader(x, y, 16, train=True, device="cpu", seed=4)
    viewed = DaliLoader(x, y, 16, train=True, device="cpu", seed=4, with_views=True)
    assert viewed.num_views == 162
    codes = []
    for e in (0, 1, 2):
        plain.set_epoch(e), viewed.set_epoch(e)
        # whole epochs (a zip would leave the longer iterator unfinished, which rebuilds its pipeline)
        for (xa, ya), (xb, yb, views) in zip(list(plain), list(viewed)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert views.dtype == torch.int64 and views.shape == yb.shape
            index, params = decode_views(views)
            assert torch.equal(y[index], yb)
            assert torch.equal(apply_crop_flip(x[index], params), (xb * 255).round().to(torch.uint8))
            codes.append(views % 162)
    codes = torch.cat(codes)
    assert len(set(codes.tolist())) > 60  # the ids really vary with the draws (144 draws over 162 views)
    flat = DaliLoader(x, y, 16, train=False, device="cpu", with_views=True)
    assert flat.num_views == 1 and torch.equal(torch.cat([v for _, _, v in flat]), torch.arange(48))


def test_teacher_cache_with_the_dali_loader():
    from rslad_fast.engine.step import teacher_logits
    from rslad_fast.engine.teacher_cache import TeacherCache
    from rslad_fast.models import build

    torch.manual_seed(0)
    teacher = build("tiny").eval()
    n = 32
    dl = DaliLoader(
        _noise(n, seed=5),
        torch.zeros(n, dtype=torch.long),
        16,
        train=True,
        device="cpu",
        seed=6,
        padding=1,
        with_views=True,
    )  # 18 views: hits within a few epochs
    cache = TeacherCache(n, dl.num_views, 10, "cpu")
    for e in range(5):
        dl.set_epoch(e)
        for xb, _, views in dl:
            torch.testing.assert_close(
                cache.logits(teacher, xb, views), teacher_logits(teacher, xb), rtol=1e-5, atol=1e-6
            )
    assert cache.lookups == 5 * n and cache.hits > 0
