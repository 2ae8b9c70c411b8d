"""Training methods: one module per method, each registering one `Method` subclass.

    natural  CE on clean data                                   (no attack, no teacher)
    sat      Madry PGD adversarial training                     (CE attack, eval mode)
    trades   TRADES                                             (KL attack, eval mode)
    mart     MART                                               (CE attack, eval mode)
    ard      ARD, distillation on x'                            (CE attack, TRAIN mode; teacher)
    iad      IAD, ARD plus the teacher's reliability            (CE attack, TRAIN mode; teacher on x and x')
    rslad    RSLAD, robust soft labels                          (KL attack on the teacher, eval mode; teacher)
    adaad    AdaAD, the teacher inside the attack               (KL(T(x')||S(x')) attack, eval mode; teacher)
    dgad     DGAD, AdaAD's attack, the teacher's mistakes routed (AdaAD's attack; teacher on x and x', swapped logits)
    peeraid  PeerAiD, a peer trained alongside the student      (KL(P(x)||S(x')) attack, eval mode; no teacher, a peer)
    mtard    MTARD, an adversarial and a natural teacher        (CE attack, eval mode; two teachers, adaptive weights)

`get(name)` returns the class (aliases: madry/pgd_at/at -> sat, nat/standard -> natural; case and '-' are
ignored), `names()` the registered names. A method is built with keyword overrides of its HPARAMS,
`get("ard")(lr_bug=True)`; the engine takes its optimizer settings from `SCHEDULE` and the lr decays that
actually happen from `milestones()` (or `lr_at(epoch)`).
"""

from typing import Tuple

from . import adaad, ard, iad, mart, mtard, natural, rslad, sat, trades  # noqa: E402,F401  (importing registers them)
from .adaad import AdaAD
from .ard import ARD
from .base import REGISTRY, Context, HParam, Method, Schedule, get, register
from .dgad import DGAD
from .iad import IAD
from .mart import MART
from .mtard import MTARD
from .natural import Natural
from .peeraid import PeerAiD
from .rslad import RSLAD
from .sat import SAT
from .trades import TRADES


def names() -> Tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(REGISTRY))


__all__ = [
    "get",
    "names",
    "register",
    "REGISTRY",
    "Method",
    "Context",
    "HParam",
    "Schedule",
    "Natural",
    "SAT",
    "TRADES",
    "MART",
    "ARD",
    "IAD",
    "RSLAD",
    "AdaAD",
    "DGAD",
    "PeerAiD",
    "MTARD",
]
