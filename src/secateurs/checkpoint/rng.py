"""Random generator states: this process's, and every rank's under ``torch.distributed``.

A checkpoint keeps one set per rank, so that each rank of a resumed data-parallel run
draws the same numbers (dropout, sampling) as it would have without the interruption.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from .header import CheckpointError

__all__ = ["check_rng_state", "gather_rng_states", "process_count", "process_rank", "rng_state",
           "set_rng_state"]

_REQUIRED = ("torch", "numpy", "numpy.gauss", "python", "python.gauss")


def process_rank() -> int:
    """This process's rank in the ``torch.distributed`` process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def process_count() -> int:
    """Number of processes in the ``torch.distributed`` process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generator states (torch, CUDA if initialised, numpy, Python)."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    out["numpy"] = torch.tensor([*np.asarray(keys).tolist(), pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    out["python.gauss"] = torch.tensor([gauss_next is not None, gauss_next or 0.0],
                                       dtype=torch.float64)
    return out


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned.

    Raises:
        CheckpointError: if ``state`` lacks a generator.
    """
    missing = set(_REQUIRED) - set(state)
    if missing:
        raise CheckpointError(f"RNG state lacks {sorted(missing)}")
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = sorted(k for k in state if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k] for k in cuda][: torch.cuda.device_count()])
    np_state = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(np_state[:-2], dtype=np.uint32), np_state[-2],
                         np_state[-1], float(state["numpy.gauss"][0])))
    py = state["python"].tolist()
    has, value = state["python.gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), value if has else None))


def check_rng_state(state: object, where: str, *, values: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has every generator of
    :func:`rng_state`, each with this process's sizes and dtypes.

    Args:
        state: What a checkpoint holds for one rank (tensors may be on the ``meta`` device).
        where: Names the source in the message.
        values: Also try the values: set them, then put this process's states back, so a
            state that a generator refuses is refused here, before anything else changes.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: RNG state must be a mapping, got "
                              f"{type(state).__name__}")
    live = rng_state()
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{where}: RNG state lacks {missing}")
    for key in _REQUIRED:
        saved, want = state[key], live[key]
        if not isinstance(saved, torch.Tensor) or saved.shape != want.shape \
                or saved.dtype != want.dtype:
            got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) \
                else type(saved).__name__
            raise CheckpointError(f"{where}: RNG state {key!r} must be {want.dtype} of shape "
                                  f"{tuple(want.shape)}, got {got}")
    if not values:
        return
    try:
        set_rng_state(state)
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:
        raise CheckpointError(f"{where}: RNG state refused by its generator: "
                              f"{type(err).__name__}: {err}") from None
    finally:
        set_rng_state(live)


def _collective_device() -> torch.device:
    """Where collectives take their tensors: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rng_states() -> dict[int, dict[str, torch.Tensor]]:
    """Every rank's :func:`rng_state`, gathered on every rank; call on all ranks.

    Returns:
        Rank -> its generator states (``{0: rng_state()}`` without a process group); what
        :func:`~secateurs.checkpoint.save` takes as ``rng``.
    """
    mine = rng_state()
    world = process_count()
    if world == 1:
        return {0: mine}
    device = _collective_device()
    out: dict[int, dict[str, torch.Tensor]] = {r: {} for r in range(world)}
    for key in sorted(mine):
        local = mine[key].to(device)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        for r, part in enumerate(parts):
            out[r][key] = part.cpu()
    return out
