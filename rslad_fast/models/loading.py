"""Load user checkpoints (teacher weights, resumed students) safely and strictly.

Why so strict:
- Files are read with ``torch.load(..., weights_only=True)`` and nothing else: a checkpoint downloaded from
  the internet must never be able to run code. A pickle that needs code is refused with a UserError.
- Weights load with ``strict=True``: a teacher that silently keeps half its random init (wrong
  architecture, renamed keys) would still "train", and produce a worthless student. Every mismatch is a
  UserError naming the missing / unexpected keys and the architecture that was expected.
- NaN or inf in any weight or buffer is a UserError naming the tensor: the file of a diverged run must not
  become a teacher or an evaluation result.

Accepted containers: a plain state dict, ``{'state_dict': sd}`` (IAD), ``{'model': sd}`` (our own training
checkpoints store ``{'model': sd, 'optimizer': ..., ...}``), ``{'net': sd}`` (ARD's ``.t7`` files),
``{'model_state_dict': sd}`` (the PyTorch tutorials), nested any of those ways, other entries (optimizer,
epoch, accuracies) ignored. Two containers holding different weights are refused as ambiguous. Key
prefixes ``module.`` (DataParallel / DDP) and ``model.`` (wrapper modules) are stripped, repeatedly.
"""

import os
import pickle
import re
import zipfile

import torch
import torch.nn as nn

from rslad_fast.errors import UserError

from .layouts import describe
from .wrn_dm import NORMALIZATIONS

# where the official codes and common tools put the weights: ours and IAD's ("state_dict"), ours
# ("model"), ARD's .t7 files ("net"), the PyTorch tutorials' ("model_state_dict")
_CONTAINER_KEYS = ("state_dict", "model", "net", "model_state_dict")
_PREFIXES = ("module.", "model.")
_MAX_LISTED = 10


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _unwrap(obj, path: str, depth: int = 0) -> dict:
    """Descend through the container keys until a flat name -> tensor dict is found; its prefixes stripped.

    Two containers holding different state dicts (``{'state_dict': A, 'model': B}``) are refused: which one
    is "the model" is a guess, and a wrong guess would load the wrong weights without a word."""
    if _is_state_dict(obj):
        return _strip_prefixes(obj, path)
    # bounded: a legit checkpoint nests two or three levels at most
    found = (
        {}
        if not isinstance(obj, dict) or depth >= 8
        else {k: obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)}
    )
    candidates = {}
    for key, inner in found.items():
        try:
            candidates[key] = _unwrap(inner, path, depth + 1)
        except UserError:
            if len(found) == 1:
                raise
    if candidates:
        keys = list(candidates)
        first = candidates[keys[0]]
        if any(not _same(first, candidates[k]) for k in keys[1:]):
            raise UserError(
                f"checkpoint {path}: ambiguous, {' and '.join(repr(k) for k in keys)} hold different "
                f"state dicts; save the one to load on its own (torch.save(ckpt[KEY], PATH))"
            )
        return first
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:_MAX_LISTED])
        what = f"a dict with keys {keys}" if obj else "an empty dict"
    else:
        what = f"a {type(obj).__name__}"
    accepted = ", ".join(f"{{{k!r}: ...}}" for k in _CONTAINER_KEYS)
    raise UserError(f"checkpoint {path}: no state dict found (got {what}); expected a state dict or one of {accepted}")


def _strip_prefixes(sd: dict, path: str) -> dict:
    out = {}
    for key, value in sd.items():
        new = key
        while new.startswith(_PREFIXES):
            new = new.split(".", 1)[1]
        if new in out:
            raise UserError(
                f"checkpoint {path}: key {key!r} collides with another key after stripping "
                f"the 'module.'/'model.' prefixes"
            )
        out[new] = value
    return out


def load_state_dict_file(path) -> dict:
    """Read ``path`` safely and return a flat ``{name: tensor}`` state dict on the CPU.

    Every failure (missing file, directory, unreadable, empty, corrupt, not a torch file, a pickle that
    would run code, no state dict inside) becomes a one-line UserError naming the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path}: is a directory, expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path}: file is empty")
    corrupt = f"checkpoint {path}: not a readable PyTorch checkpoint (corrupt, truncated or another format)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names the global it refused ("... unsupported GLOBAL posix.system ..."); other
        # unpickling errors come from random bytes or pickle opcodes it does not accept.
        found = re.search(r"GLOBAL\s+(\S+)", str(e), flags=re.IGNORECASE)
        if found:
            raise UserError(
                f"checkpoint {path}: refused, loading it would run code ({found.group(1)}); "
                f"only plain tensors and containers are accepted"
            ) from e
        raise UserError(corrupt) from e
    except PermissionError as e:
        raise UserError(f"checkpoint {path}: permission denied") from e
    except (
        OSError,
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        KeyError,
        AttributeError,
        TypeError,
        ImportError,
        IndexError,
        UnicodeDecodeError,
    ) as e:
        # torch raises all of these for truncated zips, foreign pickles and random bytes
        raise UserError(corrupt) from e
    return _unwrap(obj, path)


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"{len(keys)} ({shown}{more})"


def _drop_matching_constants(model: nn.Module, sd: dict, path: str, arch_name: str = None) -> dict:
    """Drop entries that name a *non-persistent* buffer of the model (e.g. the DM WRN's ``mean``/``std``,
    which RobustBench files store) when they hold the same values; different values mean a different input
    normalization, which would silently change the model, so that is an error."""
    persistent = set(model.state_dict())
    constants = {n: b for n, b in model.named_buffers() if n not in persistent}
    out = dict(sd)
    for name, buf in constants.items():
        if name not in out:
            continue
        value = out.pop(name)
        if value.numel() != buf.numel() or not torch.allclose(
            value.detach().float().reshape(-1).cpu(), buf.detach().float().reshape(-1).cpu(), atol=1e-4
        ):
            hint = ""
            if name in ("mean", "std") and value.numel() == 3:  # a WRN-70-16 file: is it the other normalization?
                for norm, pair in NORMALIZATIONS.items():
                    if torch.allclose(value.float().reshape(-1), torch.tensor(pair[name == "std"]), atol=1e-4):
                        hint = f" (the {norm} {name}"
                        hint += (
                            f": build it with that normalization, --wrn70-16-norm {norm})"
                            if arch_name in (None, "wrn70-16")
                            else f"; architecture {arch_name!r} normalizes with its data set's constants)"
                        )
            raise UserError(
                f"checkpoint {path}: {name!r} = {value.flatten().tolist()} differs from this "
                f"architecture's fixed {buf.flatten().tolist()}{hint}"
            )
    return out


def non_finite_names(sd: dict) -> list:
    """The names of the floating-point (or complex) tensors of a state dict holding a NaN or inf, in order;
    one device sync for the lot. What the loaders, the resume checks and the divergence check share."""
    named = [(k, v) for k, v in sd.items() if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex())]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(v).all().to(named[0][1].device) for _, v in named]).tolist()
    return [k for (k, _), good in zip(named, ok) if not good]


def _check_finite(sd: dict, path: str) -> None:
    """Refuse NaN/inf in any floating-point tensor: a diverged run's weights or BatchNorm statistics would
    otherwise load silently, and train a student on a garbage teacher or evaluate to chance accuracy."""
    bad = non_finite_names(sd)
    if bad:
        first = sd[bad[0]]
        count = int((~torch.isfinite(first)).sum())
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise UserError(
            f"checkpoint {path}: tensor {bad[0]!r} holds non-finite values (NaN or inf: {count} of "
            f"{first.numel()}){more}; refusing to load it (a diverged run?)"
        )


def _class_count_mismatch(model: nn.Module, sd: dict, expected: dict):
    """(the checkpoint's, the model's) output count when the classifier (the model's last Linear) is the only
    shape that differs, and only in its outputs; else None."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    head = {f"{linears[-1]}.weight", f"{linears[-1]}.bias"} & set(expected)
    differ = {k for k, v in expected.items() if tuple(sd[k].shape) != tuple(v.shape)}
    if not differ or not differ <= head or not all(sd[k].dim() == expected[k].dim() for k in differ):
        return None
    if any(tuple(sd[k].shape[1:]) != tuple(expected[k].shape[1:]) for k in differ):
        return None
    return int(sd[next(iter(differ))].shape[0]), int(expected[next(iter(differ))].shape[0])


def _found_vs_expected(sd: dict, expected: dict) -> str:
    """``found <the file's layout>; expected <the model's>``: the family, depth / width, class count and, for
    the file, the architecture names that load it (``layouts.describe``)."""
    return f"found {describe(sd)}; expected {describe(expected, archs=False)}"


def load_checkpoint_into(model: nn.Module, path, arch_name: str = None) -> nn.Module:
    """Load the weights in ``path`` into ``model`` strictly (in place) and return ``model``.

    ``arch_name`` only improves the error message ("expected architecture 'wrn34-10'"). A file of another
    layout is refused with one line naming the layout found and the one expected (``layouts.describe``)."""
    path = os.fspath(path)
    sd = _drop_matching_constants(model, load_state_dict_file(path), path, arch_name)
    expected = model.state_dict()
    arch = repr(arch_name) if arch_name else type(model).__name__
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing or unexpected:
        parts = [f"checkpoint {path} does not match architecture {arch}: {_found_vs_expected(sd, expected)}"]
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if not set(sd) & set(expected):
            parts.append("no key matches at all: is it a checkpoint of another architecture?")
        raise UserError("; ".join(parts))
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(sd[k].shape) != tuple(v.shape)
    ]
    if wrong:
        more = f" ... and {len(wrong) - _MAX_LISTED} more" if len(wrong) > _MAX_LISTED else ""
        classes = _class_count_mismatch(model, sd, expected)
        why = (
            "(wrong number of classes or width?)"
            if classes is None
            else f"(the checkpoint has {classes[0]} output classes, the model here {classes[1]}, the data set's "
            f"class count: a checkpoint of another data set? see --dataset)"
        )
        layouts = "" if classes is not None else f"{_found_vs_expected(sd, expected)}; "
        raise UserError(
            f"checkpoint {path} does not match architecture {arch}: {layouts}{len(wrong)} shape "
            f"mismatch(es) (checkpoint vs model): {', '.join(wrong[:_MAX_LISTED])}{more} {why}"
        )
    _check_finite(sd, path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # anything the checks above missed, e.g. an uncastable dtype
        raise UserError(f"checkpoint {path} does not load into architecture {arch}: {str(e).splitlines()[0]}") from e
    return model
