"""(c) The training loaders, one epoch each, side by side: NVIDIA DALI, the GPU-resident torch loader
(rslad_fast.data.TensorLoader), and the official code's torch DataLoader with torchvision transforms.

All do the same augmentation (random crop 32 with 4-pixel zero padding, horizontal flip, to float in [0,1])
and deliver batches of 128 on the training device. Sizes: the full 50,000-image set on CUDA, 5,120 images
on the CPU (RSLAD_FAST_BENCH_SIZE=reduced: 10,240 on CUDA).
"""

import pytest
from bench_utils import DEVICES, REDUCED, median_s, run_synced, save_result
from reference_rslad import make_dataloader, random_cifar

from rslad_fast.data import TensorLoader, dali_available

N_IMAGES = {"cpu": 5120, "cuda": 10240 if REDUCED else 50000}
BATCH = 128


def _cases():
    for device in DEVICES:
        yield device, "dataloader"
        yield device, "torch"
        yield device, "dali"


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: "-".join(c))
def test_loader_epoch(benchmark, provenance, case):
    device, impl = case
    n = N_IMAGES[device]
    benchmark.group = f"loader epoch {device} ({n} images, batch {BATCH})"
    images, labels = random_cifar(n)
    if impl == "dataloader":
        loader = make_dataloader(images, labels, BATCH, num_workers=2)

        def epoch():
            for x, _ in loader:
                x.to(device, non_blocking=True)
    elif impl == "torch":
        loader = TensorLoader(images, labels, BATCH, train=True, device=device, seed=0)

        def epoch():
            for _ in loader:
                pass
    else:
        if not dali_available():
            pytest.skip("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        from rslad_fast.data.dali import DaliLoader

        loader = DaliLoader(images, labels, BATCH, train=True, device=device, seed=0)

        def epoch():
            for _ in loader:
                pass

    provenance(device, impl=impl, images=n, batch=BATCH)
    result = run_synced(benchmark, epoch, device, rounds=3, warmup=1)  # noqa: F841
    median = median_s(benchmark)
    if median is None:
        return
    benchmark.extra_info["images_per_s"] = n / median
    save_result(
        f"loader-{device}-{impl}",
        {"device": device, "impl": impl, "images": n, "median_s": median, "images_per_s": n / median},
    )
