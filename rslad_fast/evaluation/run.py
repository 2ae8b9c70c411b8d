"""One evaluation end to end, the typed entry point behind ``python -m rslad_fast.evaluate`` and ``reproduce``:
:func:`evaluate` (an :class:`EvalSettings` in, the report out) and :func:`evaluate_run` (a run directory's
best.pt and last.pt). Every check that can fail on user input runs first, on every rank, before any attack;
``report.write`` then writes eval.json and eval.md (rank 0)."""

from __future__ import annotations

import datetime
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from rslad_fast.attacks.eval_attacks import PGD
from rslad_fast.attacks.registry import EVAL_ATTACKS
from rslad_fast.data import load_cifar, num_classes
from rslad_fast.data.cifar import NAMES as DATASETS
from rslad_fast.engine.dist import Dist, agreed
from rslad_fast.engine.precision import restore_tf32, set_tf32
from rslad_fast.engine.resolution import check_ops_device, resolve_device
from rslad_fast.engine.rundir import BEST, CHECKPOINTS, SWA_BEST, RunDir
from rslad_fast.engine.validation import describe
from rslad_fast.errors import UserError
from rslad_fast.models import ARCHS, WRN70_NORMS, build, canonical_name
from rslad_fast.models.loading import load_checkpoint_into

from . import report as eval_report
from .robustness import evaluate_model, fingerprint, sanity_check, summarize
from .settings import DEFAULT_DATA, DefaultN, EvalSettings


def evaluate_run(
    run_dir, settings: Optional[EvalSettings] = None, *, dist: Optional[Dist] = None, command: Optional[str] = None
) -> dict:
    """The report of ``run_dir``'s best.pt and last.pt under ``settings`` (default: every attack at its
    official settings on the whole test set); ``command``: what eval.json records as the command that made it."""
    return evaluate((settings or EvalSettings()).replace(run=str(run_dir), ckpt=None), dist=dist, command=command)


# ---- what to evaluate: validated, no work yet -------------------------------------------------------------


def _run_setting(config: dict, cfg_path: Path, key: str, flag: str, given, choices) -> str:
    """A setting of the run (config.json's ``key``; "cifar10" where absent: runs written before it existed
    trained CIFAR-10 models) that the flag ``flag`` (``given``, None: not given) may only repeat."""
    value = config.get(key, "cifar10")
    if value not in choices:
        raise UserError(f"{cfg_path}: {key} {value!r} is not one of {', '.join(choices)}")
    if given is not None and given != value:
        raise UserError(f"{flag} {given} disagrees with {cfg_path}, which says {key} {value!r}")
    return value


def _read_run(run_dir: Path, arch_flag, dataset_flag=None, norm_flag=None):
    """A training run's checkpoints (rows of the table), its data set and WRN-70-16 normalization, and notes
    on the checkpoints missing; only the keys of config.json that name the architecture, method, data set and
    normalization are read, so older or partial runs still evaluate."""
    if not run_dir.exists():
        raise UserError(f"run dir {run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir}: not a directory")
    rd = RunDir(run_dir)
    cfg_path = rd.config
    if not cfg_path.is_file():
        raise UserError(
            f"run dir {run_dir}: no {cfg_path.name} (the training run's resolved config); pass the "
            f"checkpoint with --ckpt PATH --arch NAME instead"
        )
    config = rd.config_dict()
    if not isinstance(config.get("student"), str):
        raise UserError(f"{cfg_path}: no 'student' architecture name in it")
    arch = canonical_name(config["student"])
    if arch_flag is not None and canonical_name(arch_flag) != arch:
        raise UserError(f"--arch {arch_flag} disagrees with {cfg_path}, which says student {config['student']!r}")
    ckpts = rd.checkpoints()
    if not ckpts:
        raise UserError(f"run dir {run_dir}: no checkpoint ({' or '.join(CHECKPOINTS)}) in it")
    method = config.get("method") if isinstance(config.get("method"), str) else None
    dataset = _run_setting(config, cfg_path, "dataset", "--dataset", dataset_flag, DATASETS)
    norm = _run_setting(config, cfg_path, "wrn70_16_norm", "--wrn70-16-norm", norm_flag, WRN70_NORMS)
    notes = [
        f"{name} not in {run_dir}; evaluated {', '.join(p.name for p in ckpts)} only"
        for name in CHECKPOINTS
        if not (run_dir / name).is_file()
    ]
    rows = [{"label": p.stem, "path": p, "arch": arch, "method": method} for p in ckpts]
    for row in rows:  # eval.json names what picked best.pt: the test subset (the default) or --val-n
        if row["path"].name in (BEST, SWA_BEST):  # the SWA student's best: the same images, its own PGD-20
            row["selection"] = describe(config)
    data = config.get("data") if isinstance(config.get("data"), str) else None
    return rows, notes, dataset, norm, data


def make_plan(args) -> dict:
    """What to evaluate and where the report goes, validated; UserError before any work or file written."""
    run_data, data_from = None, None  # the run's data folder; config.json when it is used (for its errors)
    if args.run is not None:
        rows, notes, dataset, norm, run_data = _read_run(Path(args.run), args.arch, args.dataset, args.wrn70_16_norm)
        out = Path(args.out) if args.out else Path(args.run)
        # the run's test set is in the folder it trained from (an explicit --data wins): a --data c100 run
        # evaluated without --data must not look for CIFAR-100 in ./data
        if args.data is None and run_data is not None:
            data_from = RunDir(args.run).config
    else:
        if args.arch is None:
            raise UserError(f"--ckpt needs --arch ({', '.join(ARCHS)})")
        arch = canonical_name(args.arch)
        ckpt = Path(args.ckpt)
        if not ckpt.exists():
            raise UserError(f"checkpoint {ckpt}: no such file")
        if not ckpt.is_file():
            raise UserError(f"checkpoint {ckpt}: not a file")
        rows, notes = [{"label": ckpt.name, "path": ckpt, "arch": arch, "method": None}], []
        dataset, norm = args.dataset or "cifar10", args.wrn70_16_norm or "cifar10"
        out = Path(args.out) if args.out else ckpt.parent
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    data = args.data if args.data is not None else (run_data or DEFAULT_DATA)
    return {
        "rows": rows,
        "out": out,
        "notes": notes,
        "dataset": dataset,
        "wrn70_16_norm": norm,
        "data": data,
        "data_from": data_from,
    }


def build_attacks(args, log=None) -> dict:
    """name -> attack object for the names in --attacks, with the flags' hyperparameters."""
    settings = {
        "eps": args.eps,
        "init_std": args.init_std,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "log": log,
        "verbose": args.verbose,
    }
    made = {}
    for name in args.attacks:
        e = EVAL_ATTACKS[name]
        own = {hp: args.hparam(e, hp) for hp in e.flags}
        # AutoAttack: a UserError here if pyautoattack is missing, before any work
        made[name] = e.make(**own, **{k: settings[k] for k in e.takes})
    return made


def _device(name):
    """--device (None: cuda if available) for the evaluation, on which the compiled ops must run: one error
    line now (a library built without CUDA kernels, say) instead of a traceback from the first attack."""
    device = resolve_device(name)
    check_ops_device(device)
    return torch.device(device)


def _load(args, log, dist):
    """Every check that can fail on user input, in order, before any attack runs: (plan, device, attacks,
    sanity attack, models, test images, labels)."""
    plan = make_plan(args)
    device = dist.device(str(_device(args.device)))  # torchrun: cuda:LOCAL_RANK
    attacks = build_attacks(args, log=log)
    sanity = None
    if args.sanity:
        sanity = PGD(
            eps=args.sanity_eps, alpha=args.sanity_alpha, steps=args.sanity_steps, start="uniform", name="sanity"
        )
    # every checkpoint loads (or fails) before any attack runs
    classes, norm = num_classes(plan["dataset"]), plan["wrn70_16_norm"]
    models = [
        load_checkpoint_into(build(row["arch"], classes, normalization=norm), row["path"], row["arch"]).eval()
        for row in plan["rows"]
    ]
    data = plan["data"]
    try:
        images, labels = load_cifar(
            data, train=False, dataset=plan["dataset"], download=False if args.no_download else "auto"
        )
    except UserError as e:
        if plan["data_from"] is None:
            raise
        raise UserError(f"{e} (the data folder {plan['data_from']} names; pass --data DIR where it is now)") from None
    # the rule shared with train's --eval-n: the default shrinks to a smaller test set (and says so), a
    # value the user gave must fit
    if args.n > len(labels):
        if not isinstance(args.n, DefaultN):
            raise UserError(f"--n {args.n} exceeds the {len(labels)} test images in {data}")
        plan["notes"].append(
            f"the test set in {data} holds {len(labels)} images, fewer than the default "
            f"--n {args.n}: the whole test set is evaluated"
        )
    return plan, device, attacks, sanity, models, images, labels


def evaluate(args: EvalSettings, *, dist: Optional[Dist] = None, argv=None, command: Optional[str] = None) -> dict:
    """Validate, load, evaluate; returns the report (not yet written; ``argv``: the command line it records,
    None: sys.argv).

    ``dist`` (``engine.dist.Dist``, torchrun): every rank runs this; the checks are agreed on (all ranks
    fail together), then each rank evaluates its slice (see :func:`evaluate_model`)."""

    dist = Dist() if dist is None else dist
    bar_holder = {}

    def log(line):
        bar = bar_holder.get("bar")
        (bar.write if bar is not None else print)(line, file=sys.stderr)

    plan, device, attacks, sanity, models, images, labels = agreed(dist, lambda: _load(args, log, dist))
    args = args.replace(data=plan["data"])  # the folder evaluated, as eval.json records it
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
        with tqdm(
            total=per_model * len(models),
            unit="batch",
            file=sys.stderr,
            disable=args.no_progress or not dist.is_main,
            dynamic_ncols=True,
        ) as bar:
            bar_holder["bar"] = bar
            done = {}  # weights fingerprint -> (label, results): best.pt is often last.pt, attacked once
            for row, model in zip(plan["rows"], models):
                key = fingerprint(model)
                if key in done:
                    first, res = done[key]
                    plan["notes"].append(f"{row['label']} holds the same weights as {first}: evaluated once")
                    bar.update(per_model)
                else:
                    res = evaluate_model(
                        model,
                        images,
                        labels,
                        attacks,
                        batch_size=args.batch_size,
                        device=device,
                        seed=args.seed,
                        bar=bar,
                        sanity=sanity,
                        label=row["label"],
                        dist=dist,
                    )
                    done[key] = (row["label"], res)
                entry = {
                    "label": row["label"],
                    "checkpoint": str(row["path"]),
                    "arch": row["arch"],
                    "method": row["method"],
                    **({"selection": row["selection"]} if "selection" in row else {}),
                    **summarize(res, attacks, args.tolerance),
                }
                if sanity is not None:
                    with torch.no_grad():
                        classes = model.eval()(images[:1].to(device).float().div(255)).shape[1]
                    entry["sanity"], warning = sanity_check(sanity, res["sanity"]["accuracy"], classes)
                    if warning:
                        entry["warnings"].append(warning)
                rows.append(entry)
    finally:
        restore_tf32(saved_tf32)
        bar_holder.pop("bar", None)

    return eval_report.build(
        args=args,
        argv=argv,
        command=command,
        attacks=attacks,
        sanity=sanity,
        rows=rows,
        n=n,
        device=device,
        world_size=dist.world_size,
        started=started,
        seconds=time.perf_counter() - t0,
        out=plan["out"],
        notes=plan["notes"],
        dataset=plan["dataset"],
        wrn70_16_norm=plan["wrn70_16_norm"],
    )
