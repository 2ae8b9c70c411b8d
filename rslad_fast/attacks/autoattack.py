"""AutoAttack, standard version, through the pinned PyPI package ``pyautoattack`` 0.2.0 (import name
``pyautoattack``; the attack code of Croce & Hein's reference repository fra31/auto-attack).

Standard version (Croce & Hein, ICML 2020; the AA column of RSLAD's Table 2 and of RobustBench):
APGD-CE (100 iterations, 1 restart), APGD-T (DLR-targeted, 9 target classes, 100 iterations), FAB-T
(9 target classes, 100 iterations), Square (5000 queries), l_inf, each attack run only on the points still
robust; the result is the per-image worst case over the four.

Never torchattacks' AutoAttack: it runs 10 iterations, not 100 (METHODS.md).

Why an adapter:
- ``device`` and ``eps`` are always passed explicitly (pyautoattack's defaults are 'cpu' and 0.3);
- ``seed`` is passed too (with None the package seeds from the clock: irreproducible);
- the caller's trace function (debugger, coverage) survives: pyautoattack's dynamic-defense check ends
  with ``sys.settrace(None)``;
- the model runs in ``eval()`` mode during the attack and gets its own modes back (pyautoattack does not
  touch the mode);
- pyautoattack logs to the ``auto-attack`` logger (debug lines for progress, warnings for its sanity
  checks: randomized / dynamic defense, zero gradients, Square beating the gradient attacks). The adapter
  catches that logger's records for the duration of a run, hands them to a callback (the progress bar's
  writer) and keeps the warnings so the evaluation report can flag them; nothing leaks to the root logger.
"""

from __future__ import annotations

import logging
import sys
from importlib import metadata
from typing import Callable, Dict, List, Optional

import torch

from ..errors import UserError
from .eval_attacks import EPS, EvalAttack
from .pgd import model_mode

PYAUTOATTACK_VERSION = "0.2.0"
LOGGER_NAME = "auto-attack"


def _require_pyautoattack():
    """pyautoattack's ``AutoAttack`` class, imported when an adversary is made (``rslad_fast.attacks`` loads
    without it): a missing or other version is one clear UserError, never a bare ImportError."""
    try:
        found = metadata.version("pyautoattack")
    except metadata.PackageNotFoundError:
        found = None
    if found != PYAUTOATTACK_VERSION:
        what = "is not installed" if found is None else f"is version {found}"
        raise UserError(
            f"AutoAttack needs pyautoattack=={PYAUTOATTACK_VERSION} (the reference attack code), "
            f"but it {what}; install it with `pip install pyautoattack=={PYAUTOATTACK_VERSION}` "
            f"or leave 'aa' out of --attacks"
        )
    try:
        from pyautoattack import AutoAttack as _AA
    except Exception as e:  # broken install, missing dependency
        raise UserError(f"pyautoattack {found} is installed but does not import ({type(e).__name__}: {e})") from None
    return _AA


# The standard version's configuration (fra31/auto-attack autoattack.py, `_set_version('standard')` for
# Linf, and the attack constructors in `AutoAttack.__init__`). `standard_config` must report exactly this.
STANDARD = {
    "version": "standard",
    "norm": "Linf",
    "attacks_to_run": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "apgd-ce": {"n_iter": 100, "n_restarts": 1, "loss": "ce", "rho": 0.75, "eot_iter": 1},
    "apgd-t": {
        "n_iter": 100,
        "n_restarts": 1,
        "n_target_classes": 9,
        "loss": "dlr-targeted",
        "rho": 0.75,
        "eot_iter": 1,
    },
    "fab-t": {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
    "square": {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8},
}


def build_adversary(model: torch.nn.Module, *, eps: float, device, seed: int):
    """pyautoattack's ``AutoAttack`` in the standard Linf version, device, eps and seed explicit."""
    if not 0 <= eps <= 1:
        raise UserError(f"eps must be in [0, 1] for inputs in [0, 1], got {eps}")
    return _require_pyautoattack()(
        model, norm="Linf", eps=float(eps), version="standard", device=torch.device(device), seed=int(seed)
    )


def standard_config(adversary) -> Dict[str, object]:
    """The configuration the adversary will actually run, read back from its attributes (so a change in
    the package, or a mutated adversary, shows up): compare with :data:`STANDARD` plus eps/device/seed."""
    a, t, f, s = adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square
    return {
        "version": adversary.version,
        "norm": adversary.norm,
        "attacks_to_run": list(adversary.attacks_to_run),
        # apgd.loss is set to 'ce' by run_standard_evaluation right before APGD-CE runs
        "apgd-ce": {
            "n_iter": a.n_iter,
            "n_restarts": a.n_restarts,
            "loss": "ce",
            "rho": a.thr_decr,
            "eot_iter": a.eot_iter,
        },
        "apgd-t": {
            "n_iter": t.n_iter,
            "n_restarts": t.n_restarts,
            "n_target_classes": t.n_target_classes,
            "loss": t.loss,
            "rho": t.thr_decr,
            "eot_iter": t.eot_iter,
        },
        # fab.targeted and fab.n_restarts = 1 are set by run_standard_evaluation right before FAB-T runs
        "fab-t": {
            "n_iter": f.n_iter,
            "n_restarts": f.n_restarts,
            "n_target_classes": f.n_target_classes,
            "alpha_max": f.alpha_max,
            "eta": f.eta,
            "beta": f.beta,
        },
        "square": {"n_queries": s.n_queries, "n_restarts": s.n_restarts, "p_init": s.p_init},
        "eps": adversary.epsilon,
        "eps_per_attack": {"apgd-ce": a.eps, "apgd-t": t.eps, "fab-t": f.eps, "square": s.eps},
        "device": str(adversary.device),
        "device_per_attack": {
            "apgd-ce": str(a.device),
            "apgd-t": str(t.device),
            "fab-t": str(f.device),
            "square": str(s.device),
        },
        "seed": adversary.seed,
    }


class _Capture(logging.Handler):
    """Collects the ``auto-attack`` logger's records during a run and forwards them to a callback."""

    def __init__(self, emit_line: Optional[Callable[[str], None]], verbose: bool):
        super().__init__(logging.DEBUG)
        self.emit_line, self.verbose = emit_line, verbose
        self.warnings: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg)
        if self.emit_line is not None and (self.verbose or record.levelno >= logging.WARNING):
            self.emit_line(f"[autoattack] {msg}")


class AutoAttack(EvalAttack):
    """AutoAttack (standard, Linf) as an evaluation attack: ``__call__(model, x, y) -> x_adv``.

    ``run`` also returns pyautoattack's own per-image predictions on x_adv (robust = ``y_adv == y``),
    which the evaluator uses so the AA column is exactly AutoAttack's count. Warnings logged by
    pyautoattack accumulate in ``self.warnings`` (deduplicated, in order).
    """

    name = "aa"

    def __init__(
        self,
        eps: float = EPS,
        seed: int = 0,
        batch_size: int = 250,
        log: Optional[Callable[[str], None]] = None,
        verbose: bool = False,
    ):
        _require_pyautoattack()  # a clear UserError when it is made, before any attack runs
        if not 0 <= eps <= 1:
            raise UserError(f"eps must be in [0, 1] for inputs in [0, 1], got {eps}")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.eps, self.seed, self.batch_size = float(eps), int(seed), int(batch_size)
        self.log, self.verbose = log, verbose
        self.warnings: List[str] = []
        self.last_config: Optional[Dict[str, object]] = None

    def hparams(self):
        return {
            "eps": self.eps,
            "version": "standard",
            "norm": "Linf",
            "seed": self.seed,
            "package": f"pyautoattack=={PYAUTOATTACK_VERSION}",
        }

    def run(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
    ):
        """(x_adv, y_adv): AutoAttack's adversarial images and its predictions on them (``seed`` draws its
        random starts, not ``generator``)."""
        adversary = build_adversary(model, eps=self.eps, device=x.device, seed=self.seed)
        self.last_config = standard_config(adversary)
        logger = logging.getLogger(LOGGER_NAME)
        handler = _Capture(self.log, self.verbose)
        saved = (logger.level, logger.propagate)
        # pyautoattack's check_dynamic ends with sys.settrace(None): a debugger's or coverage's tracer would
        # silently stop, so it is put back afterwards
        trace = sys.gettrace()
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        try:
            with model_mode(model, "eval"):
                x_adv, y_adv = adversary.run_standard_evaluation(x.detach(), y.detach(), batch_size=self.batch_size)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
            sys.settrace(trace)
        for w in handler.warnings:
            if w not in self.warnings:
                self.warnings.append(w)
        return x_adv.detach(), y_adv.detach()

    def __call__(self, model, x, y, generator=None):
        return self.run(model, x, y)[0]


__all__ = ["AutoAttack", "PYAUTOATTACK_VERSION", "STANDARD", "build_adversary", "standard_config"]
