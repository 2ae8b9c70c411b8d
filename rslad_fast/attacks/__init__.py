"""Attacks: the shared PGD engine (pgd.py), RSLAD's fused inner maximization, and the evaluation attacks."""
from .pgd import check_budget, fused_kl_pgd, model_mode, pgd, random_start

__all__ = ["pgd", "fused_kl_pgd", "model_mode", "random_start", "check_budget"]
