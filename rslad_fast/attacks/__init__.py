"""Attacks: the shared PGD engine (pgd.py), RSLAD's fused inner maximization, and the evaluation attacks
(eval_attacks.py; their registry ``EVAL_ATTACKS``; AutoAttack's adapter in autoattack.py)."""

from .autoattack import AutoAttack
from .eval_attacks import EVAL_ATTACKS, FGSM, PGD, Clean, CWInf, EvalAttack, pgd20_sat, pgd20_trades
from .pgd import check_budget, fused_kl_pgd, model_mode, pgd, random_start

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
