"""One source of sample inputs for the op tests: correctness, gradients and opcheck all draw from here
(pytorch/extension-cpp's `sample_inputs()`)."""

import itertools

import torch

DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES_CUDA = DTYPES_CPU  # float64 too: its reduction kernel once failed to launch on sm_90 (register limit)

# Per-dtype tolerances (absolute, relative) for values in the ops' natural range.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

KL_BATCHES = (1, 7, 128, 513)
KL_CLASSES = (2, 10, 100, 1000)
IMAGE_SHAPES = ((4, 3, 32, 32), (1, 3, 32, 32), (3, 3, 17, 5), (2, 1, 7, 9), (5,), (1, 1, 1, 1))


def make_logits(rows, classes, dtype, device="cpu", scale=3.0, seed=0, non_contiguous=False):
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:
        # A column slice of a wider tensor: rows are strided, classes are not contiguous with each other.
        base = torch.randn(rows, classes * 2, generator=g, dtype=torch.float64) * scale
        return base[:, ::2].to(device=device, dtype=dtype)
    return (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def make_pgd_inputs(shape, dtype, device="cpu", seed=0, non_contiguous=False, zero_grad_frac=0.1):
    g = torch.Generator().manual_seed(seed)

    def draw(fn):
        if non_contiguous and len(shape) >= 2:
            big = fn((*shape[:-1], shape[-1] * 2), generator=g, dtype=torch.float64)
            return big[..., ::2].to(device=device, dtype=dtype)
        return fn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    x_nat = draw(torch.rand)
    # Start near the ball's edge and outside [0, 1] so both projections and the clamp are exercised.
    x_adv = (x_nat.double() + (draw(torch.rand).double() - 0.5) * 0.1).to(dtype)
    grad = draw(torch.randn)
    mask = draw(torch.rand) < zero_grad_frac  # sign(0) = 0 must hold
    grad = grad.masked_fill(mask, 0)
    return x_adv, grad, x_nat


# A sample is named by a spec (plain values: a test can be parametrized by them before any device is touched)
# and built on the device the test runs on.
KL_GRID = (
    ((7, 10), 1.0, "batchmean"),
    ((128, 10), 1.0, "mean"),
    ((1, 2), 4.0, "sum"),
    ((513, 100), 0.5, "none"),
    ((3, 1000), 30.0, "mean"),
)


def kl_specs(dtypes=DTYPES_CPU):
    """(dtype, rows, classes, temperature, reduction, non_contiguous) over a compact grid of what the tests sweep."""
    return [
        (dtype, *shape, temp, red, nc)
        for dtype, (shape, temp, red), nc in itertools.product(dtypes, KL_GRID, (False, True))
    ]


def kl_sample(spec, device="cpu", requires_grad=False):
    """(args, kwargs) of softmax_kl for one of `kl_specs`."""
    dtype, rows, classes, temp, red, nc = spec
    s = make_logits(rows, classes, dtype, device, seed=1, non_contiguous=nc)
    t = make_logits(rows, classes, dtype, device, seed=2, non_contiguous=nc)
    if requires_grad:
        s.requires_grad_(True)
        t.requires_grad_(True)
    return (s, t), {"temperature": temp, "reduction": red}


def pgd_specs(dtypes=DTYPES_CPU):
    """(dtype, shape, non_contiguous)."""
    return list(itertools.product(dtypes, IMAGE_SHAPES[:3], (False, True)))


def pgd_sample(spec, device="cpu"):
    """(args, kwargs) of pgd_step_ for one of `pgd_specs`."""
    dtype, shape, nc = spec
    x_adv, grad, x_nat = make_pgd_inputs(shape, dtype, device, non_contiguous=nc)
    return (x_adv, grad, x_nat), {"eps": 8 / 255, "alpha": 2 / 255, "lo": 0.0, "hi": 1.0}


def spec_id(spec):
    """A readable test id for a spec: its values joined, dtypes without the `torch.` prefix."""
    words = {False: "contiguous", True: "strided"}
    return "-".join(str(v).removeprefix("torch.") if not isinstance(v, bool) else words[v] for v in spec)
