"""Robustness evaluation: the paper's Table 2 row for each checkpoint (issue 4).

    python -m rslad_fast.evaluate --run RUN_DIR                     # RUN_DIR/best.pt and RUN_DIR/last.pt
    python -m rslad_fast.evaluate --ckpt model_cifar_wrn.pt --arch wrn34-10
    python -m rslad_fast.evaluate --run RUN_DIR --attacks clean,fgsm,pgd20-sat --n 1000 --sanity

Columns (CIFAR-10 test set, first --n images, eps 8/255 for every attack unless --eps):
    Clean, FGSM, PGD_SAT (pgd20-sat), PGD_TRADES (pgd20-trades), CW∞ (cw), AA (aa), and "worst": per image,
    correct on the clean image AND under every attack that ran.
The hyperparameters and their sources are in ``attacks/eval_attacks.py`` and ``attacks/autoattack.py``;
every one has a flag here with the same default.

Output: the table printed to stdout, ``eval.json`` (numbers, configuration, device, versions, n, seed,
timings, warnings) and ``eval.md`` (the table and the same facts, for people) in --out (default: the run
dir for --run, the checkpoint's folder for --ckpt). Warnings are flagged in both and printed: a row that
breaks Clean >= FGSM >= PGD >= AA beyond --tolerance, AutoAttack's own checks, and, with --sanity, an
eps = 1 attack that leaves accuracy above chance (a broken attack or gradient masking).

Under torchrun (``torchrun --nproc_per_node=N -m rslad_fast.evaluate --run-dir RUN_DIR --n-images 1000``: there
--run and --n must be spelled --run-dir and --n-images, torchrun's own parser mistakes the short forms for
abbreviations of its options) each process evaluates a contiguous
1/N of the images (``cuda:LOCAL_RANK`` on GPUs), the per-image results are gathered, and rank 0 prints and
writes the report. Clean and FGSM figures are those of one process; attacks with a random start draw it from
one stream per rank (rank 0's is the single process's), so their figures agree with it statistically.

Bad input (missing checkpoint, wrong architecture, unknown attack, bad numbers, missing data, a run dir
without checkpoints or config) prints one ``error: ...`` line on stderr and exits with status 2, having
written nothing.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

from rslad_fast.attacks.eval_attacks import EVAL_ATTACKS, INIT_STD, Clean
from rslad_fast.attacks.pgd import STARTS
from rslad_fast.cli import fmt_value
from rslad_fast.errors import UserError

# attack name on the command line -> column of the paper's Table 2, in the table's order
COLUMNS = {name: e.column for name, e in EVAL_ATTACKS.items()}
ATTACKS = tuple(COLUMNS)
WORST = "worst"
WORST_LABEL = "Worst (all ran)"
# Clean >= FGSM >= PGD (both) >= AA: an attack at a higher level must not leave a higher accuracy
LEVELS = {name: e.level for name, e in EVAL_ATTACKS.items() if e.level is not None}
RUN_CHECKPOINTS = ("best.pt", "last.pt")
FORMAT = "rslad_fast.eval/1"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives the one-line ``error: ...`` of every other bad input (status 2)."""

    def error(self, message):
        # under torchrun every process of a node parses the same command line: one of them says it
        self.exit(2, f"error: {message} (see --help)\n" if os.environ.get("LOCAL_RANK", "0") == "0" else None)


def _number(text: str) -> float:
    """A float, or a fraction such as 8/255."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (a float or a fraction such as 8/255)")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (inputs are in [0, 1]), got {text}")
    return value


def _nonneg(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _attack_list(text: str):
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no attack given")
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown attack(s) {', '.join(map(repr, unknown))}; choose from "
                                         f"{','.join(ATTACKS)}")
    return [a for a in ATTACKS if a in names]  # the table's order, duplicates dropped


class DefaultN(int):
    """--n's default, told apart from the same number given on the command line (see the --n rule)."""


def _flag_dest(entry, hparam: str) -> str:
    return f"{entry.flag_prefix}_{hparam}".replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    # how an attack's own hyperparameter is parsed, and what --help calls it
    hparam_flags = {"steps": ({"type": _int(0)}, "steps"), "alpha": ({"type": _nonneg}, "step size"),
                    "kappa": ({"type": _nonneg}, "confidence kappa"), "start": ({"choices": STARTS}, "start")}
    p = _Parser(prog="python -m rslad_fast.evaluate",
                description="Robustness evaluation of CIFAR-10 checkpoints: the RSLAD paper's Table 2 row "
                            "(Clean, FGSM, PGD_SAT, PGD_TRADES, CW-inf, AutoAttack) per checkpoint.")
    src = p.add_argument_group("what to evaluate (one of)")
    what = src.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", metavar="RUN_DIR",
                      help="a training run: evaluates RUN_DIR/best.pt and RUN_DIR/last.pt (those present), "
                           "architecture from RUN_DIR/config.json key 'student' (under torchrun: --run-dir)")
    # --run-dir and --n-images: the same flags under torchrun, whose own parser takes --run and --n for
    # abbreviations of its --run-path and --nnodes/--nproc-per-node/... and stops with "ambiguous option"
    what.add_argument("--run-dir", dest="run", metavar="RUN_DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    what.add_argument("--ckpt", metavar="PATH", help="one checkpoint file (needs --arch), e.g. TRADES' "
                                                     "model_cifar_wrn.pt with --arch wrn34-10")
    src.add_argument("--arch", help="architecture of --ckpt (resnet18, mnv2, wrn34-10, wrn70-16, tiny); with "
                                    "--run it must agree with config.json")

    g = p.add_argument_group("evaluation")
    g.add_argument("--attacks", type=_attack_list, default=list(ATTACKS),
                   help=f"comma-separated subset of {','.join(ATTACKS)} (default: all)")
    g.add_argument("--n", type=_int(1), default=DefaultN(10000),
                   help="evaluate the first N test images (default 10000, or the whole test set when it is "
                        "smaller; an explicit N larger than the test set is an error; under torchrun: --n-images)")
    g.add_argument("--n-images", dest="n", type=_int(1), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--batch-size", type=_int(1), default=250,
                   help="images per batch, for every attack (default 250, AutoAttack's default)")
    g.add_argument("--device", default=None, help="cuda if available, else cpu")
    g.add_argument("--seed", type=_int(0), default=0, help="seed of every random start and of AutoAttack")
    g.add_argument("--data", default="./data", help="folder holding cifar-10-batches-py/ (default ./data)")
    g.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    g.add_argument("--eps", type=_fraction, default=8 / 255,
                   help="l_inf radius of every attack, in [0, 1]; fractions like 8/255 accepted (default 8/255)")
    g.add_argument("--out", help="folder for eval.json and eval.md (default: the run dir, or the checkpoint's "
                                 "folder)")
    g.add_argument("--tolerance", type=_nonneg, default=0.5,
                   help="accuracy points by which Clean >= FGSM >= PGD >= AA may be broken before it is "
                        "flagged (default 0.5)")
    g.add_argument("--allow-tf32", action="store_true",
                   help="allow TF32 convolutions/matmuls on CUDA (default: strict fp32, as training's default; "
                        "recorded in eval.json)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verbose", action="store_true", help="print AutoAttack's progress lines")

    a = p.add_argument_group("attack hyperparameters (defaults: the official evaluation codes)")
    for e in EVAL_ATTACKS.values():
        for hp in e.flags:
            kind, what = hparam_flags[hp]
            a.add_argument(f"--{e.flag_prefix}-{hp}", dest=_flag_dest(e, hp), default=e.default(hp), **kind,
                           help=f"{e.column} {what} ({fmt_value(e.default(hp))}; {e.source})")
    a.add_argument("--init-std", type=_nonneg, default=INIT_STD,
                   help=f"std of a 'normal' start, x + init_std*N(0,1) ({fmt_value(INIT_STD)}, TRADES/RSLAD)")

    s = p.add_argument_group("sanity check")
    s.add_argument("--sanity", action="store_true",
                   help="also run PGD with a huge eps, which must leave accuracy at or below chance")
    s.add_argument("--sanity-eps", type=_fraction, default=1.0, help="its eps (1.0)")
    s.add_argument("--sanity-alpha", type=_nonneg, default=0.1, help="its step size (0.1)")
    s.add_argument("--sanity-steps", type=_int(1), default=20, help="its steps (20)")
    return p


# ----------------------------------------------------------------------------- plan: validate, no work yet

def _read_run(run_dir: Path, arch_flag):
    if not run_dir.exists():
        raise UserError(f"run dir {run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir}: not a directory")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"run dir {run_dir}: no config.json (the training run's resolved config); pass the "
                        f"checkpoint with --ckpt PATH --arch NAME instead")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("student"), str):
        raise UserError(f"{cfg_path}: no 'student' architecture name in it")
    from rslad_fast.models import canonical_name
    arch = canonical_name(config["student"])
    if arch_flag is not None and canonical_name(arch_flag) != arch:
        raise UserError(f"--arch {arch_flag} disagrees with {cfg_path}, which says student {config['student']!r}")
    ckpts = [run_dir / name for name in RUN_CHECKPOINTS if (run_dir / name).is_file()]
    if not ckpts:
        raise UserError(f"run dir {run_dir}: no checkpoint ({' or '.join(RUN_CHECKPOINTS)}) in it")
    method = config.get("method") if isinstance(config.get("method"), str) else None
    notes = [f"{name} not in {run_dir}; evaluated {', '.join(p.name for p in ckpts)} only"
             for name in RUN_CHECKPOINTS if not (run_dir / name).is_file()]
    return [{"label": p.stem, "path": p, "arch": arch, "method": method} for p in ckpts], notes


def _fingerprint(model) -> str:
    """sha256 of every parameter and buffer, in order: equal for checkpoints holding the same weights."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_plan(args) -> dict:
    """Everything the run needs, validated; raises UserError before any work is done or file written."""
    from rslad_fast.models import canonical_name
    if args.run is not None:
        rows, notes = _read_run(Path(args.run), args.arch)
        out = Path(args.out) if args.out else Path(args.run)
    else:
        if args.arch is None:
            raise UserError("--ckpt needs --arch (resnet18, mnv2, wrn34-10, wrn70-16 or tiny)")
        arch = canonical_name(args.arch)
        ckpt = Path(args.ckpt)
        if not ckpt.exists():
            raise UserError(f"checkpoint {ckpt}: no such file")
        if not ckpt.is_file():
            raise UserError(f"checkpoint {ckpt}: not a file")
        rows, notes = [{"label": ckpt.name, "path": ckpt, "arch": arch, "method": None}], []
        out = Path(args.out) if args.out else ckpt.parent
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    return {"rows": rows, "out": out, "notes": notes}


def build_attacks(args, log=None) -> dict:
    """name -> attack object for the names in --attacks, with the flags' hyperparameters."""
    settings = {"eps": args.eps, "init_std": args.init_std, "seed": args.seed, "batch_size": args.batch_size,
                "log": log, "verbose": args.verbose}
    made = {}
    for name in args.attacks:
        e = EVAL_ATTACKS[name]
        own = {hp: getattr(args, _flag_dest(e, hp)) for hp in e.flags}
        # AutoAttack: a UserError here if pyautoattack is missing, before any work
        made[name] = e.make(**own, **{k: settings[k] for k in e.takes})
    return made


def _device(name):
    import torch

    from rslad_fast.engine.config import check_ops_device

    if name is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--device {name!r}: not a device ({e})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if dev.type not in ("cpu", "cuda"):
            raise UserError(f"--device {name}: only cpu and cuda are supported")
    check_ops_device(dev)  # a library built without CUDA kernels: one line now, not a traceback later
    return dev


# ----------------------------------------------------------------------------- the evaluation itself

def _percent(correct) -> float:
    """Accuracy in %, from the exact count (no float32 mean)."""
    return 100.0 * int(correct.sum()) / max(len(correct), 1)


def _attack_seed(seed: int, name: str) -> int:
    """A seed per (run seed, attack), so an attack's numbers do not depend on which others ran."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def evaluate_model(model, images, labels, attacks: dict, *, batch_size: int, device, seed: int = 0,
                   bar=None, sanity=None, label: str = "", dist=None) -> dict:
    """Run clean + ``attacks`` (name -> :class:`~rslad_fast.attacks.EvalAttack`) on uint8 ``images`` [N,3,32,32].

    Returns per attack the per-image correctness (bool CPU tensor), the accuracy in %, seconds and the
    largest l_inf perturbation seen; plus 'worst' (AND over clean and every attack) and the sanity run.

    ``dist`` (an active ``engine.dist.Dist``): this rank attacks its contiguous slice of the images; the
    per-image results of all ranks are gathered, so every rank returns the whole set's.
    """
    import torch
    from rslad_fast.data.loaders import mix_seed

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
                raise RuntimeError(f"attack {name} left the threat model: |x_adv - x|_inf = {max_linf} "
                                   f"(eps {attack.eps}), range [{x_adv.min().item()}, {x_adv.max().item()}]")
            ok[start - lo:stop - lo] = (pred == y).cpu()
            if bar is not None:
                bar.set_postfix(acc=f"{_percent(ok[:stop - lo]):.2f}")
                bar.update(1)
        if active:  # every rank's slice, in rank order: the whole set
            ok = torch.cat(dist.all_gather_object(ok))
            max_linf = max(dist.all_gather_object(max_linf))
        results[name] = {"correct": ok, "accuracy": _percent(ok),
                         "seconds": time.perf_counter() - t0, "max_linf": max_linf}
    worst = torch.ones(n, dtype=torch.bool)
    for name, r in results.items():
        if name != "sanity":
            worst &= r["correct"]
    results[WORST] = {"correct": worst, "accuracy": _percent(worst)}
    return results


def ordering_warnings(acc: dict, tolerance: float) -> list:
    """Pairs breaking Clean >= FGSM >= PGD_SAT, PGD_TRADES >= AA by more than ``tolerance`` points."""
    out = []
    ran = [a for a in LEVELS if a in acc]
    for hi in ran:
        for lo in ran:
            if LEVELS[hi] < LEVELS[lo] and acc[lo] > acc[hi] + tolerance:
                out.append(f"{COLUMNS[lo]} ({acc[lo]:.2f}) is above {COLUMNS[hi]} ({acc[hi]:.2f}) by more than "
                           f"{tolerance:g} points: expected Clean >= FGSM >= PGD >= AA (a weak attack, or "
                           f"gradient masking)")
    return out


def sanity_check(attack, accuracy: float, num_classes: int):
    """(report entry, warning or None): an attack with eps ~ 1 must leave accuracy at or below chance."""
    chance = 100.0 / num_classes
    entry = {**attack.hparams(), "accuracy": accuracy, "chance": chance, "ok": accuracy <= chance}
    warning = None
    if accuracy > chance:
        warning = (f"sanity: PGD with eps {attack.eps:g} leaves {accuracy:.2f}% accuracy, above chance "
                   f"({chance:.2f}%): the attack is broken (wrong gradient sign?) or the model masks gradients")
    return entry, warning


def _pretty(v):
    """Floats that are k/255 also shown as such (eps 8/255, step 2/255)."""
    if isinstance(v, float) and 0 < v < 1 and abs(v * 255 - round(v * 255)) < 1e-6:
        return f"{v:.6g} (={round(v * 255)}/255)"
    return str(v)


def _fmt(v):
    return "—" if v is None else f"{v:.2f}"


def table(rows: list, columns: list) -> str:
    """Markdown table in the paper's layout: one row per checkpoint."""
    head = ["checkpoint", "model", "method"] + [COLUMNS[c] for c in columns] + [WORST_LABEL]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(columns) + 1)) + "|"]
    for r in rows:
        cells = [r["label"], r["arch"], r["method"] or "—"] + [_fmt(r["accuracy"].get(c)) for c in columns]
        cells.append(_fmt(r["accuracy"][WORST]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    cfg = report["config"]
    cols = report["columns"]
    lines = [f"# Robustness evaluation ({report['data']['split']}, first {report['n']} images, "
             f"eps = {cfg['eps']:.6g} = {cfg['eps'] * 255:.4g}/255)", "",
             table(report["rows"], cols), "",
             f"*{WORST_LABEL}*: per image, correct on the clean image AND under every attack that ran "
             f"({', '.join(COLUMNS[c] for c in report['attacks_run'])}). "
             f"AA is AutoAttack's own per-image worst case over its four attacks.", ""]
    sanity_rows = [r for r in report["rows"] if r.get("sanity")]
    if sanity_rows:
        s = sanity_rows[0]["sanity"]
        lines.append(f"Sanity (PGD-{s['steps']}, eps {s['eps']:g}, step {s['alpha']:g}; must be <= "
                     f"{s['chance']:.2f}% chance): " + ", ".join(
                         f"{r['label']} {r['sanity']['accuracy']:.2f}%" for r in sanity_rows))
        lines.append("")
    lines += [f"Note: {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines.append("## Warnings")
    warns = [f"- {r['label']}: {w}" for r in report["rows"] for w in r["warnings"]]
    lines += (warns or ["none"]) + ["", "## Attacks"]
    for name, hp in cfg["attacks"].items():
        what = ", ".join(f"{k}={_pretty(v)}" for k, v in hp.items()) or "the natural images, no attack"
        lines.append(f"- {COLUMNS.get(name, name)} (`{name}`): {what}")
    if "autoattack" in cfg:
        aa = cfg["autoattack"]
        lines.append(f"- AutoAttack run configuration: {json.dumps(aa, sort_keys=False)}")
    lines += ["", "## Setup",
              "- checkpoints: " + ", ".join(f"`{r['checkpoint']}`" for r in report["rows"]),
              f"- data: `{report['data']['root']}` ({report['data']['split']}, first {report['n']} images)",
              f"- device: {report['device']} ({report['device_name']}), torch {report['torch']}, python "
              f"{report['python']}, tf32 {'allowed' if cfg['allow_tf32'] else 'off'}",
              f"- seed {report['seed']}, batch size {cfg['batch_size']}",
              f"- started {report['time']['started']}, {report['time']['seconds']:.1f} s",
              f"- command: `{report['command']}`", ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def run(args, argv=None, dist=None) -> dict:
    """Validate, load, evaluate; returns the report (not yet written).

    ``dist`` (``engine.dist.Dist``, torchrun): every rank runs this; the checks are agreed on (all ranks
    fail together), then each rank evaluates its slice (see :func:`evaluate_model`)."""
    import torch
    from tqdm import tqdm

    from rslad_fast.data import load_cifar10
    from rslad_fast.engine.dist import Dist
    from rslad_fast.engine.precision import restore_tf32, set_tf32
    from rslad_fast.models import build
    from rslad_fast.models.loading import load_checkpoint_into

    dist = Dist() if dist is None else dist
    bar_holder = {}

    def log(line):
        bar = bar_holder.get("bar")
        (bar.write if bar is not None else print)(line, file=sys.stderr)

    error = None
    try:
        plan = make_plan(args)
        device = dist.device(str(_device(args.device)))
        attacks = build_attacks(args, log=log)
        sanity = None
        if args.sanity:
            from rslad_fast.attacks.eval_attacks import PGD
            sanity = PGD(eps=args.sanity_eps, alpha=args.sanity_alpha, steps=args.sanity_steps, start="uniform",
                         name="sanity")

        models = []
        for row in plan["rows"]:  # every checkpoint loads (or fails) before any attack runs
            models.append(load_checkpoint_into(build(row["arch"]), row["path"], row["arch"]).eval())
        images, labels = load_cifar10(args.data, train=False, download=False if args.no_download else "auto")
        # the rule shared with train's --eval-n: the default shrinks to a smaller test set (and says so), a
        # value the user gave must fit
        if args.n > len(labels):
            if not isinstance(args.n, DefaultN):
                raise UserError(f"--n {args.n} exceeds the {len(labels)} test images in {args.data}")
            plan["notes"].append(f"the test set in {args.data} holds {len(labels)} images, fewer than the default "
                                 f"--n {args.n}: the whole test set is evaluated")
    except UserError as e:
        if not dist.active:
            raise
        error = str(e)
    error = dist.first_error(error)  # torchrun: all ranks stop together, none waits in a collective
    if error is not None:
        raise UserError(error)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    n = min(args.n, len(labels))
    images, labels = images[:n], labels[:n]

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    saved_tf32 = set_tf32(args.allow_tf32)  # the training engine's policy (engine/precision.py)
    lo, hi = dist.shard(n)
    n_batches = math.ceil((hi - lo) / args.batch_size)  # this rank's (the bar is rank 0's)
    per_model = (len(attacks) + ("clean" not in attacks) + (sanity is not None)) * n_batches
    rows = []
    try:
        with tqdm(total=per_model * len(models), unit="batch", file=sys.stderr,
                  disable=args.no_progress or not dist.is_main, dynamic_ncols=True) as bar:
            bar_holder["bar"] = bar
            done = {}  # weights fingerprint -> (label, results): best.pt is often last.pt, attacked once
            for row, model in zip(plan["rows"], models):
                key = _fingerprint(model)
                if key in done:
                    first, res = done[key]
                    plan["notes"].append(f"{row['label']} holds the same weights as {first}: evaluated once")
                    bar.update(per_model)
                else:
                    res = evaluate_model(model, images, labels, attacks, batch_size=args.batch_size,
                                         device=device, seed=args.seed, bar=bar, sanity=sanity,
                                         label=row["label"], dist=dist)
                    done[key] = (row["label"], res)
                acc = {name: r["accuracy"] for name, r in res.items() if name in attacks or name == WORST}
                acc_all = {name: r["accuracy"] for name, r in res.items()}
                warnings = ordering_warnings(acc_all, args.tolerance)
                if "aa" in attacks:
                    warnings += [f"autoattack: {w}" for w in attacks["aa"].warnings]
                    attacks["aa"].warnings.clear()
                entry = {"label": row["label"], "checkpoint": str(row["path"]), "arch": row["arch"],
                         "method": row["method"], "accuracy": acc, "clean_accuracy": acc_all["clean"],
                         "correct": {name: int(r["correct"].sum()) for name, r in res.items()},
                         "seconds": {name: round(r["seconds"], 3) for name, r in res.items() if "seconds" in r},
                         "max_linf": {name: r["max_linf"] for name, r in res.items()
                                      if name not in ("clean", WORST, "sanity")},
                         "warnings": warnings}
                if sanity is not None:
                    with torch.no_grad():
                        classes = model.eval()(images[:1].to(device).float().div(255)).shape[1]
                    entry["sanity"], warning = sanity_check(sanity, res["sanity"]["accuracy"], classes)
                    if warning:
                        warnings.append(warning)
                rows.append(entry)
    finally:
        restore_tf32(saved_tf32)
        bar_holder.pop("bar", None)

    config = {k: v for k, v in vars(args).items()}
    config["attacks"] = {name: a.hparams() for name, a in attacks.items()}
    if sanity is not None:
        config["sanity_attack"] = sanity.hparams()
    if "aa" in attacks and attacks["aa"].last_config is not None:
        aa_cfg = dict(attacks["aa"].last_config)
        aa_cfg.pop("device_per_attack", None)
        config["autoattack"] = aa_cfg
    try:
        from importlib import metadata
        aa_version = metadata.version("pyautoattack")
    except Exception:
        aa_version = None
    return {
        "format": FORMAT,
        "columns": [c for c in ATTACKS if c in attacks],
        "attacks_run": [c for c in ATTACKS if c in attacks or c == "clean"],
        "column_names": {**COLUMNS, WORST: WORST_LABEL},
        "rows": rows,
        "n": n,
        "n_requested": args.n,
        "seed": args.seed,
        "data": {"root": str(args.data), "split": "CIFAR-10 test"},
        "config": config,
        "device": str(device),
        "world_size": dist.world_size,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__,
        "pyautoattack": aa_version,
        "python": platform.python_version(),
        "command": " ".join(["python -m rslad_fast.evaluate"] + list(sys.argv[1:] if argv is None else argv)),
        "time": {"started": started.isoformat(timespec="seconds"), "seconds": round(time.perf_counter() - t0, 3)},
        "out": str(plan["out"]),
        "notes": plan["notes"],
    }


def write_report(report: dict) -> tuple:
    out = Path(report["out"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
    json_path, md_path = out / "eval.json", out / "eval.md"
    _write_atomic(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(md_path, _markdown(report))
    return json_path, md_path


def main(argv=None) -> int:
    from rslad_fast.engine.dist import Dist

    args = build_parser().parse_args(argv)
    try:
        dist = Dist.from_env()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.init()  # torchrun: join the process group (a single process: nothing)
    try:
        return _main(args, argv, dist)
    finally:
        dist.close()


def _main(args, argv, dist) -> int:
    try:
        report = run(args, argv, dist)
        if not dist.is_main:  # rank 0 alone writes and prints
            return 0
        json_path, md_path = write_report(report)
    except UserError as e:
        if dist.is_main:  # under torchrun the ranks agreed on it: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if dist.is_main:
            print("error: interrupted, nothing written", file=sys.stderr)
        return 130
    print(table(report["rows"], report["columns"]))
    print(f"{WORST_LABEL}: per image, correct under clean and every attack that ran.")
    for r in report["rows"]:
        for w in r["warnings"]:
            print(f"WARNING {r['label']}: {w}")
        if "sanity" in r:
            s = r["sanity"]
            print(f"sanity {r['label']}: PGD eps {s['eps']:g} -> {s['accuracy']:.2f}% "
                  f"({'ok' if s['ok'] else 'ABOVE CHANCE'}, chance {s['chance']:.2f}%)")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process
    exit_process(main())  # torchrun: see exit_process
