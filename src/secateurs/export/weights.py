"""A pruned model as a plain safetensors file, and back: masks folded in, masks found again.

The handoff format between "find the mask" and "run it" is a dense tensor with zeros
(torchao's sparsity README): :func:`save_pruned` writes the model's ``state_dict`` with
every masked entry set to ``0.0``, a file any safetensors reader loads. :func:`load_pruned`
reads such a file, from secateurs or from anyone else, and rebuilds the masks from the
zeros (``mask = weight != 0``); :meth:`Pruner.adopt_masks_ <secateurs.Pruner.adopt_masks_>`
hands them to a :class:`~secateurs.Pruner`, which then continues from that sparsity: its
next updates nest inside the adopted masks, so nothing pruned comes back
(:func:`pruner_from_zeros` does both).

A weight that is exactly zero without having been pruned is taken as pruned; in trained
float weights that practically never happens, and it is what any reader of the file sees.

Files carry the content hash of :func:`secateurs.save` checkpoints in their metadata
(:mod:`.integrity`): one changed byte makes :func:`load_pruned` raise
:class:`~secateurs.CheckpointError`. Files without one (written by an earlier secateurs,
or by anyone else) still load, with an :class:`~.integrity.UnverifiedFileWarning`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..checkpoint import check_state_dict
from ..criteria import Criterion
from ..pruner import Pruner, SparsitySpec
from ..targets import TargetSpec, resolve_targets
from .integrity import (
    FORMAT_VERSION,
    HASH_KEY,
    META_KEY,
    deduplicate,
    export_header,
    read_verified,
    restore_aliases,
    write_hashed,
)

__all__ = ["adopt_masks_", "load_pruned", "masks_from_zeros", "pruner_from_zeros",
           "save_pruned"]



def _check_masks(masks: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                 what: str) -> None:
    unknown = [n for n in masks if n not in shapes]
    if unknown:
        raise ValueError(f"masks name {unknown[:8]}, which are not {what}; valid names "
                         f"include {list(shapes)[:8]}")
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or mask.shape != shapes[name]:
            got = (f"{mask.dtype} of shape {tuple(mask.shape)}"
                   if isinstance(mask, torch.Tensor) else type(mask).__name__)
            raise ValueError(f"mask for {name!r} must be torch.bool of shape "
                             f"{tuple(shapes[name])}, got {got}")


def save_pruned(
    path: str | os.PathLike[str],
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    targets: TargetSpec = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model.state_dict()`` as safetensors, with ``masks`` folded in (masked = 0.0).

    The model is not changed; the file is written atomically, with a content hash in its
    metadata that :func:`load_pruned` checks. Tied weights are stored once (the header
    lists the other names).

    Args:
        path: Destination file.
        model: The pruned model.
        masks: Parameter name -> bool mask (``True`` = kept), e.g. ``pruner.masks``.
            ``None``: the weights are written as they are (a Pruner already zeroed them).
        targets: The pruned parameters, recorded in the header so :func:`load_pruned`
            knows where zeros are masks (default: the names in ``masks``, else every
            ``nn.Linear`` and ``nn.ConvNd`` weight).
        metadata: Extra text entries for the header (covered by the hash).

    Returns:
        The path written.

    Raises:
        ValueError: for masks that do not fit the model, or ``metadata`` that uses a name
            the file reserves (nothing is written).
    """
    reserved = sorted(k for k, v in (metadata or {}).items()
                      if k in (HASH_KEY, META_KEY) or (k == "format" and v != "pt"))
    if reserved:
        raise ValueError(f"metadata must not set {reserved}: the file reserves them")
    state = model.state_dict()
    masks = dict(masks or {})
    _check_masks(masks, {k: v.shape for k, v in state.items()}, "in the model's state_dict")
    names = list(masks) or [t.name for t in resolve_targets(model, targets)]
    tensors, aliases = deduplicate(state)
    for key, mask in masks.items():
        if key in tensors:
            tensors[key] = torch.where(mask.cpu(), tensors[key], tensors[key].new_zeros(()))
    sparsity = {n: 1.0 - int(torch.count_nonzero(state[n])) / max(1, state[n].numel())
                if n not in masks else 1.0 - int(masks[n].sum()) / max(1, masks[n].numel())
                for n in names}
    header = {"format_version": FORMAT_VERSION, "targets": names, "aliases": aliases,
              "sparsity": sparsity, "safetensors": safetensors.__version__,
              "torch": torch.__version__}
    meta = {**dict(metadata or {}), "format": "pt", META_KEY: json.dumps(header)}
    return write_hashed(path, tensors, meta)[0]


def masks_from_zeros(model: nn.Module, targets: TargetSpec = None) -> dict[str, torch.Tensor]:
    """Target name -> ``weight != 0`` (the masks a pruned weight implies)."""
    return {t.name: t.param.detach() != 0 for t in resolve_targets(model, targets)}


def load_pruned(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    targets: TargetSpec = None,
) -> dict[str, torch.Tensor]:
    """Load a pruned safetensors file into ``model`` and rebuild its masks from the zeros.

    Works for files written by :func:`save_pruned` and for any safetensors ``state_dict``
    of the same architecture (e.g. a sparse checkpoint published by someone else).

    Args:
        path: The file.
        model: Receives the weights; names, shapes and dtypes must match exactly.
        targets: Where zeros are masks (default: the targets recorded in the file, else
            every ``nn.Linear`` and ``nn.ConvNd`` weight).

    Returns:
        Target name -> bool mask, ``True`` where the loaded weight is non-zero.

    Raises:
        CheckpointError: (a ``ValueError``, naming the file) for a truncated or unreadable
            file, one whose content differs from its recorded hash (a flipped byte in a
            tensor or in the metadata), or one that does not fit the model; the model is
            not changed.

    Warns:
        UnverifiedFileWarning: for a file without a content hash (from an earlier secateurs
            or another program): it loads, but its integrity cannot be checked.
    """
    where = f"file {str(path)!r}"
    metadata, state = read_verified(path)
    info = export_header(metadata, where)
    restore_aliases(state, info["aliases"], where)
    check_state_dict(model, state, where)
    if targets is None and info.get("targets"):
        targets = list(info["targets"])
    names = [t.name for t in resolve_targets(model, targets)]
    model.load_state_dict(state, strict=True)
    return masks_from_zeros(model, names)


def adopt_masks_(pruner: Pruner, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Deprecated: call ``pruner.adopt_masks_(masks)`` (:meth:`secateurs.Pruner.adopt_masks_`).

    Raises:
        ValueError: for masks that do not fit the pruner's targets (nothing is changed).
    """
    warnings.warn("secateurs.export.adopt_masks_(pruner, masks) moved to the method "
                  "secateurs.Pruner.adopt_masks_(masks)", DeprecationWarning, stacklevel=2)
    pruner.adopt_masks_(masks)


def pruner_from_zeros(model: nn.Module, sparsity: SparsitySpec = None,
                      criterion: str | Criterion = "magnitude", **options: Any) -> Pruner:
    """A :class:`~secateurs.Pruner` whose masks start from the zeros already in ``model``.

    Arguments are those of :class:`~secateurs.Pruner`. Typical use, continuing from a
    sparse checkpoint produced elsewhere::

        load_pruned("sparse.safetensors", model)
        pruner = pruner_from_zeros(model, sparsity=Linear(0.5, 0.8, end_step=1000))
    """
    pruner = Pruner(model, sparsity, criterion, **options)
    pruner.adopt_masks_()
    return pruner
