"""BatchNorm folded into the preceding convolution, for eval-mode passes (issue 20, lever 1).

In eval mode a BatchNorm is the per-channel affine map ``y = (x - mean) * gamma / sqrt(var + eps) + beta``.
When ``x`` is the output of a convolution and nothing else reads that output, the map folds into the
convolution: ``W' = W * s`` (``s = gamma / sqrt(var + eps)`` per output channel) and
``b' = beta + (b - mean) * s`` (``b = 0`` for a bias-free conv), and the BatchNorm becomes an ``Identity``.
The folded model computes the same function up to float rounding (not bitwise).

What folds, per architecture (found by tracing, see below; ``folded/in forward/total`` BatchNorms):

- ``resnet18``  20/20/20: every BN follows its conv (stem, both convs of each block, projection shortcuts).
- ``resnet8``   9/9/9, and the ``tiny`` CNN 2/2/2, for the same reason.
- ``mnv2``      57/57/57: expand, depthwise and project convs (17 blocks), 4 projection shortcuts, the stem
  and the 1x1 head.
- ``wrn34-10``  16/31/41: TRADES' pre-activation block is ``bn1 -> relu -> conv1 -> bn2 -> relu -> conv2``,
  so only ``bn2`` directly follows a conv (15 blocks) and the first block's ``bn1`` reads the stem conv's
  output and nothing else (1). Every other ``bn1`` and the final ``bn1`` read a residual sum, which is no
  conv's output, and a BN before a ReLU cannot fold into the conv after it; they stay eval-mode BNs. The 10
  BNs of ``sub_block1`` never run in ``forward`` (TRADES keeps them for its checkpoint's keys).
- ``wrn70-16``  the same pattern: each block's ``batchnorm_1`` (33) and the first block's ``batchnorm_0``
  (stem) fold, 34/67/67.
  (The stem's BN folds only because the first block changes the width: at widen factor 1 the stem's output
  also feeds the identity shortcut, and it stays.)

How the pairs are found: ``torch.fx`` traces the (eval-mode) copy, and a ``(conv, bn)`` pair folds when the
BN's only input is the conv's output, that output has no other reader, each module runs exactly once in the
traced forward and no parameter of either is read directly, and the BN uses running statistics
(``track_running_stats``). This is exact for any architecture fx can trace; where a module cannot be traced
(a wrapper whose forward branches on its input, e.g. ``engine.teacher.CastTeacher``'s autocast block), its
children are traced one by one instead, so a wrapped model still folds. A BN that does not qualify stays an
eval-mode BN: correct, just not faster. ``pairs=`` overrides the search with an explicit list of
``(conv name, bn name)``.

API:

- :func:`fold_bn` (``model``) -> an eval-mode copy with the pairs folded, sharing no tensor with ``model``,
  in the same dtype and memory format (channels_last stays channels_last), its parameters
  ``requires_grad=False``. For the frozen teacher: fold once, use the copy.
- :class:`FoldedCopy` (``model``) for a model that keeps training (the student): ``.module`` is the folded
  copy, built once; ``.refresh()`` recomputes its weights from the model's current parameters and running
  statistics in place (``copy_``/``out=`` under ``no_grad``: the copy's tensors never move, so a CUDA graph
  captured over it, ``attacks.graphed``, stays valid and sees the new weights). Call it after every
  ``optimizer.step()`` and before the next eval-mode pass: one pass over the weights.

The copy is eval-only: its ``train(True)`` raises (a train-mode pass, e.g. ARD's or SAT-train's attack, needs
the BatchNorms the copy does not have). Use it only where the model would run in eval mode.
"""

from __future__ import annotations

import copy
import types
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Pair = Tuple[str, str]  # (conv name, bn name), qualified names in the model


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper; any other model unchanged."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _CONVS)
        and isinstance(bn, _BatchNorm)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
        and conv.out_channels == bn.num_features
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _trace_pairs(module: nn.Module, prefix: str = "") -> List[Pair]:
    """The foldable (conv, bn) pairs of `module` (names prefixed by `prefix`), from an fx trace of its
    forward in its current mode; where the trace fails, the pairs of each child traced on its own."""
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception:  # any trace failure (data-dependent control flow, unsupported calls): go one level down
        pairs = []
        for name, child in module.named_children():
            pairs += _trace_pairs(child, _join(prefix, name))
        return pairs
    mods = dict(module.named_modules())
    calls = Counter()
    attr_reads = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(mods[node.target])] += 1
        elif node.op == "get_attr":
            attr_reads.append(str(node.target))

    def read_directly(name: str) -> bool:
        return any(t == name or t.startswith(name + ".") for t in attr_reads)

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], _BatchNorm):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = mods[src.target], mods[node.target]
        if not _foldable(conv, bn) or calls[id(conv)] != 1 or calls[id(bn)] != 1:
            continue
        if read_directly(src.target) or read_directly(node.target):
            continue
        pairs.append((_join(prefix, src.target), _join(prefix, node.target)))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> List[Pair]:
    """The (conv name, bn name) pairs of `model` that fold exactly in eval mode (see the module doc).

    The search traces an eval-mode copy, so the original's modes are not touched; it costs one deepcopy."""
    model = _unwrap(model)
    probe = copy.deepcopy(model).eval()
    return _trace_pairs(probe)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[leaf] = new


def _eval_only_train(self, mode: bool = True):
    """`train` of a folded copy: eval mode only (its folded BatchNorms would be skipped in train mode)."""
    if mode:
        raise RuntimeError(
            "a BatchNorm-folded copy (rslad_fast.models.fold) runs in eval mode only: train mode needs the "
            "BatchNorms it folded away; run train-mode passes on the original model"
        )
    return nn.Module.train(self, False)


class FoldedCopy:
    """An eval-mode, BatchNorm-folded copy of `model` that follows `model`'s training.

    ``module``: the folded copy (:func:`fold_bn`), a separate set of tensors (``requires_grad=False``).
    ``refresh()``: rewrite the copy's tensors in place from ``model``'s current parameters and buffers: the
    folded convs' weights and biases from conv + BN, every other parameter and buffer (the linear layer, the
    BNs that do not fold) copied. Call it after each ``optimizer.step()`` (and after loading a state dict),
    before the next pass through ``module``. Calling the object calls ``module``.

    ``model`` may be a DDP wrapper (its ``.module`` is folded). Build the copy after the model has its final
    device, dtype and memory format: the copy takes them at construction and keeps them (refresh copies
    values, never layouts). ``pairs``: an explicit list of (conv name, bn name) instead of the traced one.
    """

    def __init__(self, model: nn.Module, *, pairs: Optional[Sequence[Pair]] = None):
        source = _unwrap(model)
        self.source = source
        folded = copy.deepcopy(source).eval()
        self.pairs: Tuple[Pair, ...] = tuple(_trace_pairs(folded) if pairs is None else (tuple(p) for p in pairs))
        self.num_bn = sum(isinstance(m, _BatchNorm) for m in source.modules())
        mods = dict(folded.named_modules())
        for conv_name, bn_name in self.pairs:
            conv, bn = mods.get(conv_name), mods.get(bn_name)
            if not _foldable(conv, bn):
                raise ValueError(f"fold: ({conv_name!r}, {bn_name!r}) is not a conv followed by a BatchNorm")
            if conv.bias is None:
                w = conv.weight
                conv.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            _set_submodule(folded, bn_name, nn.Identity())
        for p in folded.parameters():
            p.requires_grad_(False)
            p.grad = None
        folded.eval()  # the Identity modules too
        folded.train = types.MethodType(_eval_only_train, folded)
        self.module = folded

        # The refresh plan: (source conv, source bn, folded conv) per pair; (source module, attribute name,
        # copy tensor) for every other parameter and buffer of the copy.
        src_mods = dict(source.named_modules())
        self._folded = [(src_mods[c], src_mods[b], mods[c]) for c, b in self.pairs]
        folded_convs = {id(m) for _, _, m in self._folded}
        self._plain = []
        for name, module in folded.named_modules():
            if name in src_mods and not isinstance(module, nn.Identity):
                tensors = list(module._parameters.items()) + list(module._buffers.items())
                for attr, t in tensors:
                    if t is None or (id(module) in folded_convs and attr in ("weight", "bias")):
                        continue
                    self._plain.append((src_mods[name], attr, t))
        self.refresh()

    @property
    def num_folded(self) -> int:
        return len(self.pairs)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """Recompute the copy's tensors from the model's current ones, in place; returns ``module``."""
        if self._plain:
            srcs = [getattr(m, attr) for m, attr, _ in self._plain]
            dsts = [t for _, _, t in self._plain]
            torch._foreach_copy_(dsts, srcs)
        for conv, bn, dst in self._folded:
            w = conv.weight
            acc = torch.promote_types(w.dtype, torch.float32)  # fold in at least fp32 (bf16/fp16 models)
            scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.to(acc)
            shift = -bn.running_mean.to(acc) if conv.bias is None else conv.bias.to(acc) - bn.running_mean.to(acc)
            shift = shift * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(acc)
            dst.bias.copy_(shift)
            view = scale.view((-1,) + (1,) * (w.dim() - 1))
            if w.dtype == acc and dst.weight.dtype == acc:
                torch.mul(w, view, out=dst.weight)  # out= of the right shape keeps the copy's strides
            else:
                dst.weight.copy_(w.to(acc) * view)
        return self.module


def fold_bn(model: nn.Module, *, pairs: Optional[Sequence[Pair]] = None) -> nn.Module:
    """An eval-mode copy of `model` with every foldable conv -> BatchNorm pair folded into the conv (its BN
    replaced by ``nn.Identity``); shares no tensor with `model`, keeps its dtype and memory format, and leaves
    `model` itself untouched. See the module doc for what folds and :class:`FoldedCopy` for a model that
    keeps training."""
    return FoldedCopy(model, pairs=pairs).module


def fold_report(model: nn.Module) -> Dict[str, int]:
    """How many BatchNorms of `model` fold: ``{"folded": ..., "total": ...}`` (total counts every BN
    module, including any that never run in forward)."""
    pairs = find_conv_bn_pairs(model)
    return {"folded": len(pairs), "total": sum(isinstance(m, _BatchNorm) for m in _unwrap(model).modules())}


__all__ = ["FoldedCopy", "find_conv_bn_pairs", "fold_bn", "fold_report"]
