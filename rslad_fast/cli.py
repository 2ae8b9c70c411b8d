"""What the two command lines, ``python -m rslad_fast.train`` and ``python -m rslad_fast.evaluate``, share."""
from __future__ import annotations


def fmt_value(v) -> str:
    """A default as help text: eps-like floats as k/255 (8/255), other floats short (0.003, 50)."""
    if isinstance(v, float):
        if 0 < v < 1 and abs(v * 255 - round(v * 255)) < 1e-9:
            return f"{round(v * 255)}/255"
        return f"{v:g}"
    return str(v)
