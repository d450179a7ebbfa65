"""Checkpoints of a data-parallel run: written once by one rank, read by every rank.

Under ``DistributedDataParallel`` the weights, masks and optimizer state are the same on
every rank, so one rank writes them, together with every rank's RNG states; every rank
reads the file and restores its own RNG states. Call both functions on all ranks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..pruner import Pruner
from .files import Stateful, load, save
from .header import CheckpointInfo
from .rng import gather_rng_states, process_rank

__all__ = ["load_distributed", "save_distributed"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (its state-dict keys have no
    ``module.`` prefix), or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_distributed(
    path: str | os.PathLike[str],
    model: nn.Module,
    pruner: Pruner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    src: int = 0,
    states: Mapping[str, Stateful] | None = None,
    meta: Mapping[str, Any] | None = None,
    rng: bool | Mapping[int, Mapping[str, torch.Tensor]] = True,
) -> CheckpointInfo | None:
    """Write a checkpoint from rank ``src`` with every rank's RNG states; call on all ranks.

    The ranks wait for the file before returning. Outside a process group this is
    :func:`~secateurs.checkpoint.save`.

    Args:
        path: Destination; see :func:`~secateurs.checkpoint.save`.
        model: The model, or its ``DistributedDataParallel`` wrapper.
        pruner: The rank's pruner.
        optimizer: The rank's optimizer.
        src: The rank that writes.
        states: As for :func:`~secateurs.checkpoint.save`.
        meta: As for :func:`~secateurs.checkpoint.save`.
        rng: ``True`` gathers every rank's RNG states (a collective: every rank must call);
            ``False`` or a mapping rank -> states, as for :func:`~secateurs.checkpoint.save`.

    Returns:
        The header on ``src``, ``None`` elsewhere.
    """
    ranks = gather_rng_states() if rng is True else rng
    info = None
    if process_rank() == src:
        info = save(path, _unwrap(model), pruner, optimizer, states=states, meta=meta,
                    rng=ranks)
    _barrier()
    return info


def load_distributed(
    path: str | os.PathLike[str],
    model: nn.Module,
    pruner: Pruner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    states: Mapping[str, Stateful] | None = None,
    rng: bool = True,
) -> CheckpointInfo:
    """Read a checkpoint on every rank, each restoring its own RNG states; call on all ranks.

    Args:
        path: The file written by :func:`save_distributed`.
        model: The model, or its ``DistributedDataParallel`` wrapper.
        pruner: The rank's pruner.
        optimizer: The rank's optimizer.
        states: As for :func:`~secateurs.checkpoint.load`.
        rng: Restore this rank's RNG states.

    Returns:
        The header (versions, hash, ``meta``).

    Raises:
        CheckpointError: as :func:`~secateurs.checkpoint.load`; nothing is changed.
    """
    _barrier()  # the file is complete once the writing rank reached the barrier
    return load(path, _unwrap(model), pruner, optimizer, states=states, rng=rng,
                rank=process_rank())
