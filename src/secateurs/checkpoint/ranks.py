"""Checkpoints of a data-parallel run: written once by one rank, read by every rank.

Under ``DistributedDataParallel`` the weights, masks and optimizer state are the same on
every rank, so one rank writes them, together with what differs between ranks: every
rank's RNG states and criterion state (a data-driven criterion's statistics of its own
batches since masks were last updated). Every rank reads the file and restores its own.
Call both functions on all ranks. If the writing rank fails, every rank raises at once,
naming its error.
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
from .header import CheckpointError, CheckpointInfo
from .rng import _collective_device, gather_rng_states, process_count, process_rank

__all__ = ["gather_criterion_states", "load_distributed", "save_distributed"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (its state-dict keys have no
    ``module.`` prefix), or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def gather_criterion_states(pruner: Pruner, src: int = 0) -> dict[int, dict[str, Any]] | None:
    """Every rank's ``pruner.criterion.state_dict()`` on rank ``src`` (``None`` elsewhere);
    a collective, call on all ranks. Outside a process group, ``None``: one rank's state
    is the pruner's own."""
    if process_count() == 1:
        return None
    mine = _cpu(pruner.criterion.state_dict())
    gathered: list[Any] | None = [None] * process_count() if process_rank() == src else None
    # The objects travel between this job's own ranks, never through a file.
    dist.gather_object(mine, gathered, dst=src)
    return None if gathered is None else dict(enumerate(gathered))


def _share_outcome(error: BaseException | None, src: int) -> str:
    """Rank ``src`` tells every rank whether it wrote the file: ``""``, or its error."""
    if process_count() == 1:
        return "" if error is None else f"{type(error).__name__}: {error}"
    device = _collective_device()
    text = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:4096]
    size = torch.tensor([len(text)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if not int(size):
        return ""
    buf = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if error is not None:
        buf.copy_(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return bytes(buf.cpu().tolist()).decode(errors="replace")


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
    """Write a checkpoint from rank ``src`` with every rank's RNG states and criterion
    state; call on all ranks.

    The ranks wait for the file before returning; if rank ``src`` fails to write it, it
    raises its error and every other rank raises at the same time, instead of waiting
    for the process group's timeout. Outside a process group this is
    :func:`~secateurs.checkpoint.save`.

    Args:
        path: Destination; see :func:`~secateurs.checkpoint.save`.
        model: The model, or its ``DistributedDataParallel`` wrapper.
        pruner: The rank's pruner; every rank's criterion state is gathered (a
            collective), so that each rank resumes with its own statistics.
        optimizer: The rank's optimizer.
        src: The rank that writes.
        states: As for :func:`~secateurs.checkpoint.save`.
        meta: As for :func:`~secateurs.checkpoint.save`.
        rng: ``True`` gathers every rank's RNG states (a collective: every rank must call);
            ``False`` or a mapping rank -> states, as for :func:`~secateurs.checkpoint.save`.

    Returns:
        The header on ``src``, ``None`` elsewhere.

    Raises:
        CheckpointError: on the ranks other than ``src``, when ``src`` failed (the
            message names its error); ``src`` raises the error itself.
    """
    ranks = gather_rng_states() if rng is True else rng
    criteria = None if pruner is None else gather_criterion_states(pruner, src)
    info = None
    error: BaseException | None = None
    if process_rank() == src:
        try:
            info = save(path, _unwrap(model), pruner, optimizer, states=states, meta=meta,
                        rng=ranks, criterion_states=criteria)
        except Exception as err:  # told to every rank before it is raised here
            error = err
    outcome = _share_outcome(error, src)
    if error is not None:
        raise error
    if outcome:
        raise CheckpointError(f"rank {src} failed to write checkpoint {str(path)!r}: "
                              f"{outcome}")
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
    """Read a checkpoint on every rank, each restoring its own RNG states and criterion
    state; call on all ranks.

    Args:
        path: The file written by :func:`save_distributed`.
        model: The model, or its ``DistributedDataParallel`` wrapper.
        pruner: The rank's pruner; receives the criterion state this rank saved (the
            writing rank's, for a rank the file has none for: a run resumed on more
            processes).
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
