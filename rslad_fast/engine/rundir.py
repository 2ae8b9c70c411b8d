"""A training run's folder: its file layout, its lock, the checks before one is created, and what its files
say (configuration, completed epochs, metrics). The one place that spells a run file's name: the runner,
``evaluate`` and ``reproduce`` all go through :class:`RunDir`.

Layout::

    config.json      the resolved Config (written before training starts)
    metrics.jsonl    one line per completed epoch (metrics.py)
    curves.png       loss / accuracy / lr curves, redrawn after each epoch
    last.pt          checkpoint after the latest epoch (checkpoint.py)
    best.pt          checkpoint of the epoch with the best held-out PGD-20 accuracy
    swa_last.pt      PeerAiD: its SWA student after the latest epoch (from its first average on), in a
    swa_best.pt      checkpoint of the same form, and that student at its best held-out PGD-20 accuracy
    teacher/         the self-trained teacher's own run directory (distillation without --teacher)
    eval.json        ``evaluate``'s report of best.pt and last.pt (and eval.md, for people)
    tensorboard/     --tensorboard: the per-epoch scalars and the config as TensorBoard events (tb_log.py)
    .lock            flock'ed by the process working in the directory, for the whole run (RunLock)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from rslad_fast.atomic import atomic_write_bytes
from rslad_fast.errors import UserError

from .checkpoint import load_checkpoint
from .config import Config, read_config_file, validate
from .dist import Dist
from .metrics import MetricsLog

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
LAST = "last.pt"
BEST = "best.pt"
LOCK = ".lock"  # flock'ed for the life of a run (RunLock)
TEACHER = "teacher"  # a self-trained teacher's run directory, inside its student's
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
TENSORBOARD = "tensorboard"  # --tensorboard's event files (tb_log.py)
SWA_BEST = "swa_best.pt"  # PeerAiD's SWA student (methods/peeraid.py), at its best held-out PGD-20 accuracy
SWA_LAST = "swa_last.pt"  # and after the latest epoch
CHECKPOINTS = (BEST, LAST)  # what ``evaluate --run`` evaluates, in this order, and says when one is missing
AVERAGED = (SWA_BEST, SWA_LAST)  # then these, where the run wrote them


class RunDir:
    """The paths of a run directory and what its files say; creating, locking and writing it are the
    module's functions (:func:`create_run_dir`, :class:`RunLock`, :func:`write_config`)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / CONFIG)
    metrics = property(lambda self: self.path / METRICS)
    curves = property(lambda self: self.path / CURVES)
    last = property(lambda self: self.path / LAST)
    best = property(lambda self: self.path / BEST)
    swa_best = property(lambda self: self.path / SWA_BEST)
    swa_last = property(lambda self: self.path / SWA_LAST)
    eval_json = property(lambda self: self.path / EVAL_JSON)
    tensorboard = property(lambda self: self.path / TENSORBOARD)

    def teacher(self, name: str = TEACHER) -> "RunDir":
        return RunDir(self.path / name)

    def checkpoints(self) -> list:
        """best.pt and last.pt, then swa_best.pt and swa_last.pt (PeerAiD): those present."""
        return [self.path / n for n in CHECKPOINTS + AVERAGED if (self.path / n).is_file()]

    def has_config(self) -> bool:
        return self.config.is_file()

    def config_dict(self) -> dict:
        """config.json as a dict, before any check of its keys (``evaluate --run`` needs only a few)."""
        return read_config_file(self.config)

    def read_config(self) -> Config:
        """The validated Config (``--resume``'s checks and messages)."""
        return read_config(self.path)

    def completed_epochs(self) -> tuple:
        """(completed epochs, planned epochs): (0, None) without config.json, (0, planned) without last.pt."""

        if not self.has_config():
            return 0, None
        epochs = self.config_dict().get("epochs")
        if not self.last.is_file():
            return 0, epochs
        return int(load_checkpoint(self.last)["epoch"]), epochs

    def metrics_records(self) -> list:
        """metrics.jsonl's records, a torn or unparsable line skipped (the one reader of it)."""

        return MetricsLog(self.metrics).read()

    def content(self) -> list:
        """What the folder holds besides the lock and a killed write's temporaries."""
        return _content(self.path)


def read_config(run_dir) -> Config:
    """The Config of an existing run directory (for --resume)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such directory")
    if not path.is_file():
        if not _content(run_dir):
            raise UserError(
                f"--resume {run_dir}: no {CONFIG} there (a start interrupted before it was written); "
                f"start the run again with --out {run_dir}"
            )
        raise UserError(f"--resume {run_dir}: no {CONFIG} there, not a run directory")
    try:
        d = read_config_file(path)  # the one reader of config.json, shared with evaluate --run
    except UserError as e:
        raise UserError(f"--resume {run_dir}: {e}") from None
    try:
        cfg = Config.from_dict(d)
        validate(cfg)  # a config.json edited by hand gets the checks a new run's flags get
    except UserError as e:
        raise UserError(f"--resume {run_dir}: {CONFIG}: {e}") from None
    return cfg


def _no_content(name: str) -> bool:
    """A file of ours that is no part of a run: the lock, or the temporary of an atomic write that a killed
    process left (``.NAME.tmp-PID``, see checkpoint.atomic_write)."""
    return name == LOCK or re.fullmatch(r"\..+\.tmp-\d+", name) is not None


def _content(run_dir: Path) -> list:
    return [p for p in run_dir.iterdir() if not _no_content(p.name)]


def check_out_dir(run_dir, overwrite: bool) -> None:
    """Refuse to start a new run in a non-empty directory unless --overwrite (and then only a run dir).
    A folder holding only the lock and stale temporaries (a start killed while writing config.json) is
    empty."""
    run_dir = Path(run_dir)
    try:
        if os.path.lexists(run_dir) and not run_dir.is_dir():
            raise UserError(f"--out {run_dir} exists and is not a directory")
        _check_writable(run_dir)
        if run_dir.is_dir() and _content(run_dir):
            if not overwrite:
                raise UserError(
                    f"--out {run_dir} already exists and is not empty; pass --resume {run_dir} to "
                    f"continue that run, or --overwrite to replace it"
                )
            if not (run_dir / CONFIG).is_file():
                raise UserError(
                    f"--out {run_dir} is not empty and holds no {CONFIG}: not a run directory, "
                    f"refusing to delete it even with --overwrite"
                )
    except OSError as e:
        raise UserError(f"--out {run_dir}: {e.strerror or e}") from None


def _check_writable(run_dir: Path) -> None:
    """RUN_DIR can be made (or written) here: no file where a folder must be, a writable folder, names the
    file system takes. Checked before anything is written, so that these fail with one line up front."""
    missing, p = [], Path(os.path.abspath(run_dir))
    while not os.path.isdir(p):
        if os.path.lexists(p):
            raise UserError(f"--out {run_dir}: {p} is a file, not a folder")
        missing.append(p.name)
        p = p.parent
    try:
        limit = os.pathconf(p, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in missing:
        size = len(os.fsencode(name))
        if size > limit:
            raise UserError(
                f"--out {run_dir}: the name {name[:16]}... is {size} bytes, over the file system's limit of {limit}"
            )
    if not os.access(p, os.W_OK | os.X_OK):  # also False on a read-only file system, root included
        raise UserError(f"--out {run_dir}: {p} is not writable")


def _outermost_missing(run_dir: Path) -> Optional[Path]:
    """The outermost folder of RUN_DIR's path that does not exist yet (None: RUN_DIR exists)."""
    p, top = Path(os.path.abspath(run_dir)), None
    while not os.path.lexists(p):
        top, p = p, p.parent
    return top


def _remove_empty(run_dir: Path, created: Optional[Path]) -> None:
    """Undo a partial ``mkdir(parents=True)``: the empty folders from RUN_DIR up to ``created``."""
    p = Path(os.path.abspath(run_dir))
    while created is not None:
        try:
            os.rmdir(p)
        except OSError:
            return
        if p == created:
            return
        p = p.parent


# ---- creating and locking ---------------------------------------------------------------------------------


def write_config(run_dir, cfg: Config) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())


class RunLock:
    """RUN_DIR's exclusive lock (``fcntl.flock`` on RUN_DIR/.lock), held until :meth:`close` or until the
    process ends, however it ends (the kernel drops a dead process's flock; the file it leaves behind is
    no content and locks nothing). Rank 0 only: a directory in use by another process (training, resuming
    or being overwritten) is a UserError."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self._file = None
        if fcntl is None:  # no flock on this platform: run unlocked
            return
        while True:
            try:
                f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
            except OSError as e:
                raise UserError(f"{run_dir}: cannot create its lock file {LOCK} ({e.strerror})") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = f.read().strip()
                f.close()
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise UserError(
                        f"{run_dir} is in use by another process"
                        f"{f' (pid {holder})' if holder.isdigit() else ''}; wait until it ends or "
                        f"use another --out"
                    ) from None
                raise UserError(f"{run_dir}: cannot lock {LOCK} ({e.strerror})") from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(f.fileno())
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
            f.close()  # locked the file its last holder removed on release (see close): take the new one
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")  # for the message above
        f.flush()
        self._file = f

    def close(self) -> None:
        """Release the lock, removing the file while still holding it (a process that opened the old file
        meanwhile sees that its name is gone and opens the new one)."""
        if self._file is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        self._file.close()
        self._file = None


def create_run_dir(run_dir, cfg: Config, *, overwrite: bool = False, dist: Dist = Dist()):
    """Create (or, with overwrite, empty) the run directory, lock it and write config.json. Rank 0 only
    (other ranks: None). Returns the :class:`RunLock`: close it when the run ends."""
    run_dir = Path(run_dir)
    if not dist.is_main:
        return None
    created = _outermost_missing(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
    except (OSError, UserError) as e:
        _remove_empty(run_dir, created)
        if isinstance(e, UserError):
            raise
        raise UserError(f"--out {run_dir}: cannot create it ({e.strerror or e})") from None
    try:
        check_out_dir(run_dir, overwrite)  # again, under the lock: what another process did meanwhile counts
        for child in run_dir.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        write_config(run_dir, cfg)
    except BaseException as e:
        if created is not None:  # made by this call and locked by it: no half-made run directory stays
            shutil.rmtree(created, ignore_errors=True)
        lock.close()
        if isinstance(e, OSError):
            raise UserError(f"--out {run_dir}: {e.strerror or e}") from None
        raise
    return lock
