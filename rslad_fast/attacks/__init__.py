"""Attacks: the shared PGD engine (pgd.py), RSLAD's fused inner maximization (kl_pgd.py, CUDA-graphed in
graphed.py), and the evaluation attacks (eval_attacks.py; AutoAttack's adapter in autoattack.py; their
registry ``EVAL_ATTACKS`` in registry.py)."""

from .autoattack import AutoAttack
from .eval_attacks import FGSM, PGD, Clean, CWInf, EvalAttack, pgd20_sat, pgd20_trades
from .kl_pgd import fused_kl_pgd
from .pgd import check_budget, model_mode, pgd, random_start
from .registry import EVAL_ATTACKS

__all__ = [
    "pgd",
    "fused_kl_pgd",
    "model_mode",
    "random_start",
    "check_budget",
    "EVAL_ATTACKS",
    "EvalAttack",
    "Clean",
    "FGSM",
    "PGD",
    "CWInf",
    "AutoAttack",
    "pgd20_sat",
    "pgd20_trades",
]
