"""``--tensorboard``: metrics.jsonl's per-epoch scalars and the run's config as TensorBoard events, in
``RUN_DIR/tensorboard/`` (``rundir.RunDir.tensorboard``); rank 0 writes, as it writes metrics.jsonl.

TensorBoard is an optional dependency (``pip install 'rslad_fast[tensorboard]'``): imported here only when a
run asks for it, and its absence is one UserError in the run's checks (:func:`require`), before anything is
written.

One event per scalar of each epoch's metrics record (its numbers; ``epoch`` is the step, 1-based), written and
flushed right after the record's metrics line and before that epoch's last.pt, and the config as text at step
0. A resumed run appends a new event file to the same folder, opened with ``purge_step``: the first epoch it
trains (TensorBoard's readers then drop every event of that step and later from the earlier files, as they do
for any restarted writer). An epoch whose events were written but whose last.pt was not (a kill in between)
is so redone without a duplicate step, as its metrics line is.
"""

from __future__ import annotations

import json
from pathlib import Path

from rslad_fast.errors import UserError

# metrics.jsonl keys -> the TensorBoard group of their tag (``<group>/<key>``): the key stays the one metrics.jsonl
# and metrics.py name, the group puts related curves side by side
_GROUPS = (
    ("swa_", "swa"),  # PeerAiD's SWA student: its held-out accuracy beside the student's
    ("train_", "train"),
    ("clean_acc", "eval"),
    ("pgd20_acc", "eval"),
    ("eval_n", "eval"),
    ("teacher_", "teacher_cache"),
    ("lr", "optim"),
)
CONFIG_TAG = "config"


def require():
    """``torch.utils.tensorboard.SummaryWriter``, or the UserError a run asking for it without the package gets."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(
            f"--tensorboard needs the tensorboard package, which is not importable ({type(e).__name__}: {e}); "
            f"install it with `pip install 'rslad_fast[tensorboard]'` (tensorboard==2.21.0), or train without "
            f"--tensorboard (metrics.jsonl holds the same numbers)"
        ) from None
    return SummaryWriter


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics record's key: ``train/train_loss``, ``eval/pgd20_acc``, ..."""
    group = next((g for prefix, g in _GROUPS if key.startswith(prefix)), "speed" if key.endswith("_s") else "run")
    return f"{group}/{key}"


def scalars(record: dict) -> dict:
    """A metrics record's scalars by tag: every number but the epoch (the step) and the flags (``best``)."""
    return {
        tag(k): float(v)
        for k, v in record.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoardLog:
    """Rank 0's writer of one run's events (see the module doc); ``start``: the epochs already completed."""

    def __init__(self, path, *, start: int, config: dict):
        writer_cls = require()
        self.path = Path(path)
        # the first step this writer owns: after a resume the next epoch; a new run (or one restarted before
        # its first last.pt) owns everything, its config text included
        self.writer = writer_cls(str(self.path), purge_step=start + 1 if start else 0, flush_secs=3600)
        if not start:
            text = "```json\n" + json.dumps(config, indent=2) + "\n```"  # TensorBoard renders text as markdown
            self.writer.add_text(CONFIG_TAG, text, global_step=0)
            self.writer.flush()

    def epoch(self, record: dict) -> None:
        """Write and flush one epoch's scalars (step: its 1-based epoch)."""
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
