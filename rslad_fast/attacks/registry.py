"""The registry of evaluation attacks ``python -m rslad_fast.evaluate`` is built from: :data:`EVAL_ATTACKS`.

Its own module because it is the one place that names every attack, AutoAttack's adapter included, and that
adapter builds on ``eval_attacks``: the attack modules import one way, this registry sits above them all.
pyautoattack itself stays optional: ``autoattack.py`` imports it only when an AutoAttack is made.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .autoattack import AutoAttack
from .eval_attacks import FGSM, Clean, CWInf, EvalAttack, pgd20_sat, pgd20_trades


@dataclass(frozen=True)
class Entry:
    """One attack as ``python -m rslad_fast.evaluate`` offers it."""

    name: str  # in --attacks and in eval.json
    column: str  # the paper's Table 2 column
    level: Optional[int]  # place in Clean >= FGSM >= PGD >= AA (equal: unordered); None: outside it
    make: Callable[..., EvalAttack]  # keyword hyperparameters, defaulting to the official values -> attack
    takes: Tuple[str, ...] = ("eps",)  # evaluation-wide settings passed on (--eps, --init-std, --seed, ...)
    flag_prefix: str = ""  # its own hyperparameters' flags: --<flag_prefix>-<hyperparameter>
    flags: Tuple[str, ...] = ()  # ... for these hyperparameters of ``make``
    source: str = ""  # the code its defaults come from (for the flags' help)

    def default(self, hparam: str):
        """The official value of one of ``make``'s hyperparameters (its keyword's default)."""
        return inspect.signature(self.make).parameters[hparam].default


_PGD_SETTINGS = ("eps", "init_std")
_REGISTERED = (
    Entry("clean", "Clean", 0, Clean, takes=()),
    Entry("fgsm", "FGSM", 1, FGSM),
    Entry(
        "pgd20-sat", "PGD_SAT", 2, pgd20_sat, _PGD_SETTINGS, "pgd-sat", ("steps", "alpha", "start"), "IAD eval_robust"
    ),
    Entry(
        "pgd20-trades",
        "PGD_TRADES",
        2,
        pgd20_trades,
        _PGD_SETTINGS,
        "pgd-trades",
        ("steps", "alpha", "start"),
        "TRADES pgd_attack_cifar10",
    ),
    Entry(
        "cw", "CW∞", None, CWInf, _PGD_SETTINGS, "cw", ("steps", "alpha", "kappa", "start"), "IAD eval_robust, cwloss"
    ),
    Entry("aa", "AA", 3, AutoAttack, ("eps", "seed", "batch_size", "log", "verbose")),
)
# name -> entry, in the table's order
EVAL_ATTACKS: Dict[str, Entry] = {r.name: r for r in _REGISTERED}
# the attacks of the shared PGD engine at their official settings: name -> factory
PRESETS = {name: r.make for name, r in EVAL_ATTACKS.items() if name not in ("clean", "aa")}

__all__ = ["EVAL_ATTACKS", "PRESETS", "Entry"]
