"""The command line of ``python -m rslad_fast.export``: argv -> :class:`ExportSettings` -> one :func:`export`
call; bad input is one ``error: ...`` line and status 2, a failed verification one line and status 1.

    python -m rslad_fast.export --run RUN_DIR                                  # best.pt, every format
    python -m rslad_fast.export --run RUN_DIR --ckpt last --format onnx --batch 1 --n 200
"""

from __future__ import annotations

import argparse

from rslad_fast.cli import Parser, integer, nonneg, print_error
from rslad_fast.errors import UserError

from . import ATOL, ATTACK, CKPTS, METADATA, ExportSettings, export
from .formats import NAMES, parse_formats
from .verify import VerificationError


def _formats(text: str) -> list:
    try:
        return parse_formats(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--format: ")) from None


def _batch(text: str):
    if str(text).strip().lower() == "dynamic":
        return None
    return integer(1)(text)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rslad_fast.export",
        description="Export a run's student (eval mode, BatchNorm folded, taking [0, 1] images) to ONNX, "
        "TorchScript and/or a torch.export program, each verified on test images and on PGD-20 examples "
        f"against the PyTorch model before it is kept; {METADATA} beside it.",
    )
    p.add_argument(
        "--run", required=True, metavar="RUN_DIR", help="a training run directory (config.json, best.pt / last.pt)"
    )
    p.add_argument(
        "--ckpt",
        choices=CKPTS,
        default="best",
        help="which checkpoint (default best; swa_best / swa_last: a PeerAiD run's SWA student)",
    )
    p.add_argument(
        "--format",
        dest="formats",
        type=_formats,
        default=list(NAMES),
        help=f"comma-separated subset of {','.join(NAMES)}, or all (default: all)",
    )
    p.add_argument("--out", help="output folder (default RUN_DIR/export/CKPT); a previous export there is replaced")
    p.add_argument(
        "--batch",
        type=_batch,
        default=None,
        help="the artifact's batch dimension: dynamic (default) or a fixed N (every format then takes exactly N "
        "images: TorchScript through a scripted guard around its traced graph)",
    )
    p.add_argument(
        "--n", type=integer(1), default=500, help="test images the verification runs (the first N; default 500)"
    )
    p.add_argument(
        "--atol",
        type=nonneg,
        default=ATOL,
        help=f"tolerance: the largest |logit difference| artifact vs PyTorch allowed, on the clean and the PGD-20 "
        f"images (default {ATOL:g}); every prediction must agree except where the PyTorch model's top two "
        f"logits are within 2 x atol (counted as near-ties). A mismatch fails the export (status 1, nothing written)",
    )
    p.add_argument("--no-fold-bn", dest="fold_bn", action="store_false", help="keep the BatchNorms (default: folded)")
    p.add_argument(
        "--eval-json", help="the evaluate report to take the checkpoint's row from (default RUN_DIR/eval.json)"
    )
    p.add_argument("--data", help="data folder of the test images (default: the run's, from config.json)")
    p.add_argument(
        "--device",
        default="cpu",
        help=f"where the {ATTACK} examples are made: cpu (default), cuda, cuda:N, auto; the artifacts run on the CPU",
    )
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the PGD-20 random start (default 0)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = ExportSettings(**vars(args))
    try:
        result = export(settings)
    except VerificationError as e:
        print_error(f"{e}; nothing written")
        return 1
    except UserError as e:
        print_error(e)
        return 2
    except KeyboardInterrupt:
        print_error("interrupted, nothing written")
        return 130
    files = ", ".join(p.name for p in result.files.values())
    print(f"verified; wrote {files} and {METADATA} in {result.out}")
    return 0
