"""The training engine behind ``python -m rslad_fast.train`` and ``reproduce``: a :class:`Config` in, a run
directory out (:func:`train`, :func:`resume`).

settings.py    RunSettings: what a user asks of a run, every field None where not given
presets.py     the presets and the per-epoch evaluation attack, each value documented
resolution.py  RunSettings + preset + official values -> Config; the self-trained teacher's derivation
config.py      the resolved, validated Config (config.json)
rundir.py      a run directory: file layout, lock, out-dir checks, config/metrics/epochs read back
preparation.py phase 1: every check that can fail on user input and the loading it needs, no writes
train_run.py   train() / resume(): checks, lock, the teacher's stage, the student's run
build.py       the one builder of a step's objects (runner, estimate, benchmarks)
runner.py      the training driver: build, resume from last.pt, epochs, checkpoints
loop.py        one training epoch (EpochState); clean + PGD-20 evaluation on the held test subset
step.py        one training step (the loop's and the benchmarks'); the teacher's logits
estimate.py    time estimates measured on this machine (the train log's estimate line, reproduce --dry-run)
teacher_cache.py  the teacher's logits per augmented view, computed once per run (--teacher-cache)
teacher.py     load a teacher checkpoint / freeze and cast a teacher
precision.py   the TF32 policy shared with evaluate
allocator.py   keep freed CPU memory in the process (glibc)
checkpoint.py  weights_only-loadable checkpoints with every RNG state (bitwise resume)
metrics.py     metrics.jsonl and curves.png
tb_log.py      --tensorboard: metrics.jsonl's scalars and the config as TensorBoard events (rank 0)
validation.py  --val-n: the training images held out for the per-epoch evaluation and best.pt
dist.py        torchrun: rank / world size, the process group, the collectives (rank 0 writes)
"""

from .config import Config
from .dist import Dist
from .loop import Diverged, evaluate, train_one_epoch
from .preparation import prepare
from .resolution import resolve, teacher_settings
from .rundir import RunDir, check_out_dir, create_run_dir, read_config
from .settings import RunSettings
from .train_run import resume, train
from .train_run import run_prepared as run  # the teacher's stage, then the student's run

__all__ = [
    "Config",
    "Dist",
    "Diverged",
    "RunDir",
    "RunSettings",
    "check_out_dir",
    "create_run_dir",
    "evaluate",
    "prepare",
    "read_config",
    "resolve",
    "resume",
    "run",
    "teacher_settings",
    "train",
    "train_one_epoch",
]
