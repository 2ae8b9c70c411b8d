"""``python -m rslad_fast.reproduce``: the paper's Table 2 and training curves from one resumable sweep (the
command line and its text: ``cli.py``; the plan: ``plan.py``; the table and curves: ``table.py``; the paper's
figures: ``paper.py``)."""

from rslad_fast.errors import UserError

from .cli import build_parser, main
from .paper import PAPER
from .plan import check_plan_file, completed_epochs, eval_done, make_plan, write_plan
from .table import _cell

__all__ = [
    "PAPER",
    "UserError",
    "_cell",
    "build_parser",
    "check_plan_file",
    "completed_epochs",
    "eval_done",
    "main",
    "make_plan",
    "write_plan",
]
