"""``reproduce --dry-run``'s side: each stage's estimated cost on this machine, from one short measured step
(``engine/estimate.py``), and the plan as it prints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from rslad_fast.engine import estimate
from rslad_fast.engine.estimate import fmt_duration
from rslad_fast.engine.rundir import RunDir

from .plan import Plan, completed_epochs, eval_done, teacher_idle, train_state

# the dry run times each training step and evaluation pass at most at this batch size and scales it linearly:
# a paper-sized step (WRN-34-10 TRADES at 128) takes minutes on a CPU, a step's cost is close to linear in the
# batch there, and on a GPU a small batch errs on the slow side; it also bounds the dry run's memory (a paper
# sweep's dry run that timed its evaluation passes at evaluate's batch of 250 was seen at 14.6 GB on the CPU)
MEASURE_BATCH = 32
TRAIN_IMAGES = 50000  # CIFAR-10's and CIFAR-100's training sets, for a run on all of them


def estimate_stages(plan: Plan, dist=None) -> dict:
    """Stage -> estimated seconds of its remaining work on this machine, from a short measured step.

    Under torchrun (``dist``) every rank measures on its own device, at once: none waits minutes in a
    collective for rank 0's timing."""
    est, seen = {}, {}
    for s in plan.stages:
        if s.kind == "train":
            done, _ = completed_epochs(s.run_dir)
            cfg = s.cfg
            if done >= cfg.epochs or teacher_idle(plan, s):
                continue
            small = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, MEASURE_BATCH))
            device = dist.device(cfg.device) if dist is not None else None
            per_batch = estimate.measure_train_step(small, device=device) * cfg.batch_size / small.batch_size
            world = dist.world_size if dist is not None else 1
            batches = estimate.batches_per_epoch(cfg.train_n or TRAIN_IMAGES, cfg.batch_size, world)
            eval_s = estimate.measure_eval_seconds(cfg, images=math.ceil(cfg.held_n / world), device=device)
            est[s.name, s.kind] = estimate.estimate_run(cfg, per_batch, batches, cfg.epochs - done, eval_seconds=eval_s)
            seen[s.name] = cfg
        elif not eval_done(plan, s.run_dir):
            cfg = seen.get(s.name) or s.cfg
            n = min(plan.opts.n, 10000)
            one = estimate.eval_attack_seconds(
                cfg.student,
                plan.opts.attacks,
                n,
                dist.device(cfg.device) if dist is not None else cfg.device,
                min(plan.opts.eval_batch_size, MEASURE_BATCH),  # timed small and scaled, as training's step
                num_classes=cfg.num_classes,
                **_accuracies(s.run_dir),
            )
            # best.pt and last.pt (once when they hold the same weights), and a PeerAiD run's swa_best.pt and
            # swa_last.pt where it averages
            est[s.name, s.kind] = (4 if estimate.averaged_epochs(cfg, cfg.epochs) else 2) * one
    return est


def _accuracies(run_dir: Path) -> dict:
    """A trained run's last held-out clean and PGD-20 accuracy (fractions), which size AutoAttack's work: its
    APGD-CE runs on the correctly classified points, its later attacks on those still robust; {} (the
    estimate's defaults) before the run has an epoch."""
    try:
        last = RunDir(run_dir).metrics_records()[-1]
        return {"clean": float(last["clean_acc"]), "robust": float(last["pgd20_acc"])}
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return {}


def print_plan(plan: Plan, est: dict) -> None:
    print(f"plan for {plan.out} ({plan.opts.preset} preset):")
    for i, s in enumerate(plan.stages, 1):
        if s.kind == "train":
            cfg = s.cfg
            done, _ = completed_epochs(s.run_dir)
            batches = math.ceil((cfg.train_n or TRAIN_IMAGES) / cfg.batch_size)
            state = {"done": "finished", "resume": f"resume at epoch {done + 1}", "new": "new"}[train_state(s)]
            if state != "finished" and teacher_idle(plan, s):
                state = "not needed: every distillation run is finished"
            what = f"train {cfg.method} {cfg.student}: {cfg.epochs} epochs x {batches} batches of {cfg.batch_size}" + (
                f", teacher {cfg.teacher['arch']}" if cfg.teacher else ""
            )
        else:
            state = "finished" if eval_done(plan, s.run_dir) else "to do"
            what = f"evaluate best.pt, last.pt: {','.join(plan.opts.attacks)}"
        cost = est.get((s.name, s.kind))
        print(f"  {i:2d}. {s.name:<18} {what} [{state}]" + (f" ~{fmt_duration(cost)}" if cost else ""))
    total = sum(est.values())
    epochs = sum(s.cfg.epochs for s in plan.stages if s.kind == "train")
    print(
        f"{sum(s.kind == 'train' for s in plan.stages)} training runs ({epochs} epochs), "
        f"{sum(s.kind == 'evaluate' for s in plan.stages)} evaluations; remaining work: "
        + (
            f"about {fmt_duration(total)} on this machine (each step timed once here, at most at batch "
            f"{MEASURE_BATCH}, scaled)"
            if est
            else "none, every stage is finished"
        )
    )
