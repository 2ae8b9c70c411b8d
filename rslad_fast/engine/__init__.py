"""The training engine behind ``python -m rslad_fast.train``.

config.py      resolved, validated run configuration (config.json)
runner.py      prepare (all checks, no writes) -> create_run_dir -> run (train / resume, teacher first)
loop.py        one training epoch; clean + PGD-20 evaluation on the held test subset
step.py        one training step (the loop's and the benchmarks'); the teacher's logits
estimate.py    time estimates measured on this machine (the train log's estimate line, reproduce --dry-run)
teacher_cache.py  the teacher's logits per augmented view, computed once per run (--teacher-cache)
precision.py   the TF32 policy shared with evaluate
allocator.py   keep freed CPU memory in the process (glibc)
checkpoint.py  atomic, weights_only-loadable checkpoints with every RNG state (bitwise resume)
metrics.py     metrics.jsonl and curves.png
teacher.py     load a teacher checkpoint / freeze a teacher
dist.py        torchrun: rank / world size, the process group, the collectives (rank 0 writes)
"""

from .config import Config, resolve
from .dist import Dist
from .loop import Diverged, evaluate, train_one_epoch
from .runner import check_out_dir, create_run_dir, prepare, read_config, run

__all__ = [
    "Config",
    "Dist",
    "Diverged",
    "check_out_dir",
    "create_run_dir",
    "evaluate",
    "prepare",
    "read_config",
    "resolve",
    "run",
    "train_one_epoch",
]
