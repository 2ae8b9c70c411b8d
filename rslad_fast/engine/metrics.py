"""Per-epoch metrics (``metrics.jsonl``) and the training-curves figure (``curves.png``).

``metrics.jsonl``: one JSON object per line, one line per completed epoch, appended after the epoch's
checkpoint decision. Keys (see ``loop.py`` / ``runner.py`` for how each is measured)::

    epoch           1-based epoch number
    lr              learning rate used during that epoch
    train_loss      mean of the method's loss over the epoch's batches
    train_<stat>    mean of each statistic the method reports in ctx.stats (loss_adv, acc_nat, ...)
    clean_acc       top-1 accuracy (fraction) on the held-out images (the first eval_n test images, or --val-n's)
    pgd20_acc       accuracy under PGD-20 (see ``train.EVAL_ATTACK``) on the same subset
    eval_n          size of that subset
    epoch_time_s    wall time of the epoch's training part (s)
    eval_time_s     wall time of the evaluation (s)
    images_per_s    training throughput of the epoch (images/s, all processes together)
    teacher_cache_hit_rate, teacher_forwards_saved
                    with the teacher-logit cache (engine/teacher_cache.py): the fraction of the epoch's
                    images whose T(x) was served from it, and how many (teacher forwards skipped)
    best            whether this epoch's weights became best.pt
    world_size      processes that trained the epoch (torchrun; 1 otherwise): the global batch is
                    batch_size x world_size, the train_* means and images_per_s are over all of them

A resumed run first drops every line after the checkpoint's epoch (and any torn last line), so the file
always describes exactly the epochs of ``last.pt``.

``curves.png``: loss, clean and PGD-20 accuracy, and lr against epoch, in the spirit of the RSLAD paper's
Figs. 2 and 3. Drawn with matplotlib's Agg canvas directly (no pyplot global state, no display needed).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from rslad_fast.atomic import atomic_write_bytes


class MetricsLog:
    def __init__(self, path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """The records, skipping a torn or unparsable line (a run killed while appending)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
                out.append(rec)
        return out

    def truncate_after(self, epoch: int) -> list[dict]:
        """Keep only the records of epochs <= ``epoch`` (atomic rewrite); return them."""
        keep = [r for r in self.read() if r["epoch"] <= epoch]
        if self.path.exists():
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        return keep

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def plot_curves(records: list[dict], path, title: str = "") -> None:
    """Write the curves of ``records`` to ``path`` (PNG, atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ep = [r["epoch"] for r in records]

    def col(key):
        return [r.get(key, math.nan) if r.get(key) is not None else math.nan for r in records]

    fig = Figure(figsize=(13, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(ep, col("train_loss"), marker="o", ms=3, label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_acc.plot(ep, [100 * a for a in col("clean_acc")], marker="o", ms=3, label="clean")
    ax_acc.plot(ep, [100 * a for a in col("pgd20_acc")], marker="s", ms=3, label="PGD-20")
    if any("swa_pgd20_acc" in r for r in records):  # PeerAiD's SWA student, from its first average on
        ax_acc.plot(ep, [100 * a for a in col("swa_clean_acc")], ls="--", marker="o", ms=3, label="SWA clean")
        ax_acc.plot(ep, [100 * a for a in col("swa_pgd20_acc")], ls="--", marker="s", ms=3, label="SWA PGD-20")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    n = records[-1].get("eval_n") if records else None
    ax_acc.set_title(f"held-out accuracy ({n} test images)" if n else "held-out accuracy")
    ax_acc.legend()
    ax_lr.plot(ep, col("lr"), marker="o", ms=3, drawstyle="steps-mid")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    if records and all(v > 0 for v in col("lr")):
        ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
