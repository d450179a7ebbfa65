"""Pruning under ``torch.distributed`` (DDP through ``torchrun``): one set of masks everywhere.

Under DistributedDataParallel every rank holds the same weights (gradients are averaged
before each optimizer step), so a criterion that reads only the weights (``magnitude``,
``l1``) gives every rank the same scores, and selection, being deterministic, the same
masks. What differs between ranks is the data: a data-driven criterion (``contribution``,
``taylor``) keeps statistics of its own rank's batches. Two ways make masks agree:

- ``sync="reduce"`` (the default): before a mask update is due, the criterion's
  statistics (every floating-point tensor of its ``state_dict``) are averaged across
  ranks; every rank then computes the same scores and masks itself. For ``contribution``,
  whose statistic is an exponential moving average of per-batch means of ``|x|^p``, the
  average over equally sized shards is exactly the statistic of the global batch (the
  average is linear), so masks equal those of a single process on the global batch.
  Costs one all-reduce of the statistics per update (per-feature vectors for
  ``contribution``), and one of a 32-byte fingerprint of the masks to check they agree
  (a mismatch raises rather than let ranks drift apart).
- ``sync="broadcast"``: rank 0's masks, the pruned weights and their optimizer state are
  broadcast after each update: any criterion, even one with per-rank state (a ``random``
  criterion seeded per rank), ends identical; costs a broadcast of the target weights per
  update, and the masks follow rank 0's data only.

A plain ``pruner.step()`` under a process group does not let ranks drift apart either:
the built-in data-driven criteria average their statistics across ranks themselves
before scoring (see :class:`~secateurs.criteria.DataCriterion`); :func:`step` adds the
check that the masks agree, and the broadcast mode.

Calibration statistics of a one-shot pass (:func:`all_reduce_stats_`) are sums and are
summed across ranks. Checkpoints are written by one rank, with every rank's RNG states
and criterion statistics, and read by all: :func:`secateurs.checkpoint.save_distributed`
and :func:`secateurs.checkpoint.load_distributed`.

FSDP is not supported: under FSDP2 (``fully_shard``) parameters are ``DTensor`` shards,
and a :class:`~secateurs.Pruner` refuses them when it is built. Supporting them needs
scores gathered per target (or a distributed top-k) and masks sharded like their
parameters. Prune before sharding, or train with DDP.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .calibration import InputStats
from .criteria import Criterion
from .criteria.data import DataCriterion
from .pruner import Pruner

__all__ = [
    "all_reduce_criterion_",
    "all_reduce_stats_",
    "broadcast_pruned_",
    "check_masks_agree",
    "is_distributed",
    "rank",
    "step",
    "unwrap",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _device() -> torch.device:
    """Where collectives take their tensors: the current CUDA device under NCCL, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (its state-dict keys have no
    ``module.`` prefix), or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor across ranks in place, one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1).to(_device()) for t in group])
        dist.all_reduce(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(part.view_as(t))


def all_reduce_criterion_(criterion: Criterion) -> None:
    """Average every floating-point tensor of the criterion's state across ranks.

    Exact for statistics that are means over equally sized shards (``contribution``'s
    moving average of ``mean |x|^p``); a criterion without tensors is left alone.
    """
    if world_size() == 1:
        return
    if isinstance(criterion, DataCriterion):
        criterion.all_reduce_()  # the same average, and the criterion knows it is shared
        return
    state = criterion.state_dict()
    floats = [t for t in _tensors(state) if t.is_floating_point()]
    if not floats:
        return
    _all_reduce_sum_(floats)
    for t in floats:
        t.div_(world_size())
    criterion.load_state_dict(state)


def all_reduce_stats_(stats: Mapping[str, InputStats]) -> None:
    """Sum calibration statistics (power sums, ``X^T X``, counts) across ranks in place.

    Each rank calibrates on its own shard (:func:`secateurs.calibration.calibrate`); after
    this call every rank holds the statistics of all shards together, as one process
    calibrating on every batch would.
    """
    if world_size() == 1:
        return
    tensors: list[torch.Tensor] = []
    counts = torch.tensor([float(stats[name].count) for name in stats], dtype=torch.float64)
    for s in stats.values():
        tensors += [s.power_sums[p] for p in sorted(s.power_sums)]
        tensors += [] if s.xtx is None else [s.xtx]
    _all_reduce_sum_([*tensors, counts])
    for s, n in zip(stats.values(), counts.tolist(), strict=True):
        s.count = round(n)


def _fingerprint(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.int64).to(_device())


def check_masks_agree(masks: Mapping[str, torch.Tensor]) -> None:
    """Raise ``RuntimeError`` unless every rank holds the same masks (compares a SHA-256)."""
    if world_size() == 1:
        return
    low = _fingerprint(masks)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"masks differ between ranks after a mask update (rank {rank()}); the criterion's "
            "statistics are not averaged by all_reduce_criterion_: use sync='broadcast'")


@torch.no_grad()
def broadcast_pruned_(pruner: Pruner, src: int = 0) -> None:
    """Make every rank's masks, parameters and their optimizer state equal ``src``'s."""
    if world_size() == 1:
        return
    names = list(pruner.masks)
    flat = torch.cat([pruner.masks[n].reshape(-1).to(_device(), torch.uint8) for n in names])
    dist.broadcast(flat, src)
    for name, part in zip(names, flat.split([pruner.masks[n].numel() for n in names]),
                          strict=True):
        pruner.masks.set_(name, part.view(pruner.masks[name].shape).bool())
    # Every parameter, not only targets: channel masks also cover biases and norms.
    params = list(pruner.model.parameters())
    state = [] if pruner.optimizer is None else [
        v for p in params for v in pruner.optimizer.state.get(p, {}).values()
        if isinstance(v, torch.Tensor) and v.shape == p.shape]
    for t in [*params, *state]:
        dist.broadcast(t.data, src)


def _reduce_then_step(pruner: Pruner) -> bool:
    if pruner.step_count % pruner.update_every == 0:
        all_reduce_criterion_(pruner.criterion)
    updated = pruner.step()
    if updated:
        check_masks_agree(pruner.masks)
    return updated


def _step_then_broadcast(pruner: Pruner) -> bool:
    crit = pruner.criterion
    if isinstance(crit, DataCriterion) and crit.sync:
        crit.sync = False  # rank 0's masks win: no need to average the statistics first
        try:
            updated = pruner.step()
        finally:
            crit.sync = True
    else:
        updated = pruner.step()
    if updated:
        broadcast_pruned_(pruner)
    return updated


SYNCS: dict[str, Callable[[Pruner], bool]] = {
    "reduce": _reduce_then_step,
    "broadcast": _step_then_broadcast,
}


def step(pruner: Pruner, *, sync: str = "reduce") -> bool:
    """``pruner.step()`` for data-parallel training: masks end identical on every rank.

    Call it on every rank right after ``optimizer.step()``, in place of ``pruner.step()``.
    Outside a process group it is exactly ``pruner.step()``.

    Args:
        pruner: The rank's pruner, built on the wrapped module (``ddp.module``).
        sync: ``"reduce"`` (average the criterion's statistics before an update; masks
            checked to agree) or ``"broadcast"`` (rank 0's masks and pruned weights are
            broadcast after it). See the module docstring for which to choose.

    Returns:
        ``True`` when masks were updated at this step.

    Raises:
        ValueError: for an unknown ``sync``.
        RuntimeError: under ``"reduce"``, if masks still differ between ranks.
    """
    if sync not in SYNCS:
        raise ValueError(f"unknown sync {sync!r}; valid: {', '.join(SYNCS)}")
    if world_size() == 1:
        return pruner.step()
    return SYNCS[sync](pruner)


# Checkpoint functions that lived here; they warn and forward for one release.
_MOVED = {"save": "save_distributed", "load": "load_distributed",
          "gather_rng_states": "gather_rng_states"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        new = _MOVED[name]
        warnings.warn(f"secateurs.distributed.{name} moved to secateurs.checkpoint.{new}",
                      DeprecationWarning, stacklevel=2)
        from . import checkpoint

        return getattr(checkpoint, new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
