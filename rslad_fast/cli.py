"""What the two command lines, ``python -m rslad_fast.train`` and ``python -m rslad_fast.evaluate``, share: the
parser whose bad flag is one ``error: ...`` line, the parsing of numbers, the error line itself, and the
torchrun frame around a main (join the process group, leave it, agree on failed checks)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from typing import Callable

from rslad_fast.attacks.registry import EVAL_ATTACKS
from rslad_fast.engine.dist import Dist, agreed  # noqa: F401  (agreed: the command lines' phases)
from rslad_fast.errors import UserError
from rslad_fast.evaluation.robustness import ATTACKS


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives the one-line ``error: ...`` of every other bad input (status 2)."""

    def error(self, message):
        # under torchrun every process of a node parses the same command line: one of them says it
        self.exit(2, f"error: {message} (see --help)\n" if os.environ.get("LOCAL_RANK", "0") == "0" else None)


def attack_list(text: str):
    """--attacks of evaluate and reproduce: names of the evaluation-attack registry, in the table's order."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no attack given")
    unknown = [n for n in names if n not in EVAL_ATTACKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown attack(s) {', '.join(map(repr, unknown))}; choose from {','.join(ATTACKS)}"
        )
    return [a for a in ATTACKS if a in names]  # the table's order, duplicates dropped


def print_error(message) -> None:
    """``error: <message>`` on stderr, on one line whatever the message holds."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def number(text: str) -> float:
    """A finite float, also written as a fraction: ``0.031``, ``8/255``, ``2e-4``."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (a float or a fraction such as 8/255)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (eps: inputs are in [0, 1])."""
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (inputs are in [0, 1]), got {text}")
    return value


def nonneg(text: str) -> float:
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def integer(minimum: int):
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def milestones(text: str) -> list:
    """``"100,150"`` -> [100, 150]; ``"none"`` or ``""`` -> [] (no decay)."""
    s = str(text).strip().lower()
    if s in ("", "none"):
        return []
    try:
        return [int(v) for v in s.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"milestones must be comma-separated integers, got {text!r}") from None


def fmt_value(v) -> str:
    """A default as help text: eps-like floats as k/255 (8/255), other floats short (0.003, 50)."""
    if isinstance(v, float):
        if 0 < v < 1 and abs(v * 255 - round(v * 255)) < 1e-9:
            return f"{round(v * 255)}/255"
        return f"{v:g}"
    return str(v)


def torchrun_main(body: Callable[..., int]) -> int:
    """``body(dist)`` between joining torchrun's process group and leaving it (a single process: plain
    ``body(Dist())``); a broken torchrun environment is one error line and status 2."""
    try:
        dist = Dist.from_env()
    except UserError as e:
        print_error(e)
        return 2
    dist.init()
    try:
        return body(dist)
    finally:
        dist.close()


# ---- SIGTERM as Ctrl-C --------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers (and torchrun, when a rank fails) send before a kill: handled as Ctrl-C is,
    a clean stop between two writes, each of which is atomic."""


def _on_sigterm(signum, frame):
    raise Terminated()


def stop_status(e: KeyboardInterrupt) -> tuple:
    """(what happened, exit status): 128 + the signal number, as a shell reports a process it ended."""
    return (
        ("terminated (SIGTERM)", 128 + signal.SIGTERM)
        if isinstance(e, Terminated)
        else ("interrupted", 128 + signal.SIGINT)
    )


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) while inside; only the main thread can
    install signal handlers, elsewhere (a test's thread) nothing changes."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        yield
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
