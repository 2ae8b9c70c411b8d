"""One model under the evaluation attacks: per-image results, the per-image worst case, and the checks on the
figures (every x_adv inside the threat model, Clean >= FGSM >= PGD >= AA, a huge-eps attack at chance)."""

from __future__ import annotations

import hashlib
import time
import zlib

import torch

from rslad_fast.attacks.eval_attacks import Clean
from rslad_fast.attacks.registry import EVAL_ATTACKS
from rslad_fast.data.loaders import mix_seed

# attack name on the command line -> column of the paper's Table 2, in the table's order
COLUMNS = {name: e.column for name, e in EVAL_ATTACKS.items()}
ATTACKS = tuple(COLUMNS)
WORST = "worst"
# Clean >= FGSM >= PGD (both) >= AA: an attack at a higher level must not leave a higher accuracy
LEVELS = {name: e.level for name, e in EVAL_ATTACKS.items() if e.level is not None}


def _percent(correct) -> float:
    """Accuracy in %, from the exact count (no float32 mean)."""
    return 100.0 * int(correct.sum()) / max(len(correct), 1)


def _attack_seed(seed: int, name: str) -> int:
    """A seed per (run seed, attack), so an attack's numbers do not depend on which others ran."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def fingerprint(model) -> str:
    """sha256 of every parameter and buffer, in order: equal for checkpoints holding the same weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate_model(
    model,
    images,
    labels,
    attacks: dict,
    *,
    batch_size: int,
    device,
    seed: int = 0,
    bar=None,
    sanity=None,
    label: str = "",
    dist=None,
) -> dict:
    """Run clean + ``attacks`` (name -> :class:`~rslad_fast.attacks.EvalAttack`) on uint8 ``images`` [N,3,32,32].

    Returns per attack the per-image correctness (bool CPU tensor), the accuracy in %, seconds and the
    largest l_inf perturbation seen; plus 'worst' (AND over clean and every attack) and the sanity run.

    ``dist`` (an active ``engine.dist.Dist``): this rank attacks its contiguous slice of the images; the
    per-image results of all ranks are gathered, so every rank returns the whole set's.
    """
    n = len(labels)
    active = dist is not None and dist.active
    lo, hi = dist.shard(n) if active else (0, n)
    device = torch.device(device)
    model = model.to(device)

    todo = dict(attacks)
    todo.setdefault("clean", Clean())  # always: "worst" includes it, and so do the ordering checks
    if sanity is not None:
        todo["sanity"] = sanity
    results = {}
    for name, attack in todo.items():
        ok = torch.zeros(hi - lo, dtype=torch.bool)
        attack_seed = _attack_seed(seed, name)  # rank 0: the single process's stream; others: their own
        if active and dist.rank > 0:
            attack_seed = mix_seed(attack_seed, dist.rank)
        gen = torch.Generator(device=device).manual_seed(attack_seed)
        max_linf, t0 = 0.0, time.perf_counter()
        if bar is not None:
            bar.set_description(f"{label} {name}".strip())
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            x = images[start:stop].to(device).float().div_(255)
            y = labels[start:stop].to(device)
            x_adv, pred = attack.run(model, x, y, generator=gen)
            max_linf = max(max_linf, (x_adv - x).abs().max().item())
            if max_linf > attack.eps + 1e-6 or x_adv.min().item() < 0 or x_adv.max().item() > 1:
                raise RuntimeError(
                    f"attack {name} left the threat model: |x_adv - x|_inf = {max_linf} "
                    f"(eps {attack.eps}), range [{x_adv.min().item()}, {x_adv.max().item()}]"
                )
            ok[start - lo : stop - lo] = (pred == y).cpu()
            if bar is not None:
                bar.set_postfix(acc=f"{_percent(ok[: stop - lo]):.2f}")
                bar.update(1)
        if active:  # every rank's slice, in rank order: the whole set
            ok = torch.cat(dist.all_gather_object(ok))
            max_linf = max(dist.all_gather_object(max_linf))
        results[name] = {
            "correct": ok,
            "accuracy": _percent(ok),
            "seconds": time.perf_counter() - t0,
            "max_linf": max_linf,
        }
    worst = torch.ones(n, dtype=torch.bool)
    for name, r in results.items():
        if name != "sanity":
            worst &= r["correct"]
    results[WORST] = {"correct": worst, "accuracy": _percent(worst)}
    return results


def summarize(results: dict, attacks: dict, tolerance: float) -> dict:
    """A report row's figures from :func:`evaluate_model`'s ``results``: the accuracy under each attack of
    ``attacks`` and in the worst case, exact counts, seconds, the largest perturbations, and the warnings of
    the ordering check and of AutoAttack's own checks (taken from it: the next model starts with none)."""
    accuracy = {name: r["accuracy"] for name, r in results.items()}
    warnings = ordering_warnings(accuracy, tolerance)
    if "aa" in attacks:
        warnings += [f"autoattack: {w}" for w in attacks["aa"].warnings]
        attacks["aa"].warnings.clear()
    return {
        "accuracy": {name: a for name, a in accuracy.items() if name in attacks or name == WORST},
        "clean_accuracy": accuracy["clean"],
        "correct": {name: int(r["correct"].sum()) for name, r in results.items()},
        "seconds": {name: round(r["seconds"], 3) for name, r in results.items() if "seconds" in r},
        "max_linf": {name: r["max_linf"] for name, r in results.items() if name not in ("clean", WORST, "sanity")},
        "warnings": warnings,
    }


def ordering_warnings(acc: dict, tolerance: float) -> list:
    """Pairs breaking Clean >= FGSM >= PGD_SAT, PGD_TRADES >= AA by more than ``tolerance`` points."""
    out = []
    ran = [a for a in LEVELS if a in acc]
    for hi in ran:
        for lo in ran:
            if LEVELS[hi] < LEVELS[lo] and acc[lo] > acc[hi] + tolerance:
                out.append(
                    f"{COLUMNS[lo]} ({acc[lo]:.2f}) is above {COLUMNS[hi]} ({acc[hi]:.2f}) by more than "
                    f"{tolerance:g} points: expected Clean >= FGSM >= PGD >= AA (a weak attack, or "
                    f"gradient masking)"
                )
    return out


def sanity_check(attack, accuracy: float, num_classes: int):
    """(report entry, warning or None): an attack with eps ~ 1 must leave accuracy at or below chance."""
    chance = 100.0 / num_classes
    entry = {**attack.hparams(), "accuracy": accuracy, "chance": chance, "ok": accuracy <= chance}
    warning = None
    if accuracy > chance:
        warning = (
            f"sanity: PGD with eps {attack.eps:g} leaves {accuracy:.2f}% accuracy, above chance "
            f"({chance:.2f}%): the attack is broken (wrong gradient sign?) or the model masks gradients"
        )
    return entry, warning
