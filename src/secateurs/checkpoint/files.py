"""Saving and loading checkpoint files: what goes in, and the checks before anything changes."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..pruner import Pruner
from .atomic import write_atomic
from .codec import Encoder, decode, encode
from .digest import content_digest
from .header import (
    FORMAT,
    FORMAT_VERSION,
    HASH_KEY,
    HEADER_KEY,
    CheckpointError,
    CheckpointInfo,
    read_header,
    versions,
)
from .rng import process_rank, rng_state, set_rng_state

__all__ = ["Stateful", "check_state_dict", "load", "read_info", "save"]

Stateful = Any  # anything with state_dict() and load_state_dict(state)


def _check_types(model: object, pruner: object, optimizer: object) -> None:
    for name, value, kind, shown in [
            ("model", model, nn.Module, "a torch.nn.Module"),
            ("pruner", pruner, Pruner, "a secateurs.Pruner or None"),
            ("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer or None")]:
        if not isinstance(value, kind) and not (value is None and name != "model"):
            raise TypeError(f"{name} must be {shown}, got {type(value).__name__}")


# -- saving ---------------------------------------------------------------------------------

def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    pruner: Pruner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    states: Mapping[str, Stateful] | None = None,
    meta: Mapping[str, Any] | None = None,
    rng: bool | Mapping[int, Mapping[str, torch.Tensor]] = True,
) -> CheckpointInfo:
    """Write a checkpoint atomically: weights, masks, optimizer, schedules, controllers, RNG.

    Args:
        path: Destination file (conventionally ``*.safetensors``); replaced atomically.
        model: Its ``state_dict()`` (parameters and buffers).
        pruner: Its step, masks (bit-packed), last applied targets and criterion state
            (calibration statistics of data-driven criteria included).
        optimizer: Its ``state_dict()`` (momentum, Adam moments, learning rates).
        states: Name -> any object with ``state_dict()``/``load_state_dict()``: LR
            schedulers (``ScheduledLR``, ``torch.optim.lr_scheduler``), controllers
            (``Plateau``), a data sampler. Their state must be tensors, numbers, strings,
            ``None``, lists, tuples and dicts.
        meta: JSON-serialisable values to keep beside (epoch, metrics); read back by
            :func:`read_info`.
        rng: ``True`` saves this process's RNG states, ``False`` none; a mapping rank ->
            :func:`~secateurs.checkpoint.rng_state` saves one per rank (see
            :func:`~secateurs.checkpoint.save_distributed`).

    Returns:
        The header of what was written.

    Raises:
        TypeError: if some state holds a value that cannot be saved (nothing is written).
    """
    _check_types(model, pruner, optimizer)
    enc = Encoder()
    sections: dict[str, Any] = {"model": encode(model.state_dict(), "model", enc)}
    if pruner is not None:
        sections["pruner"] = encode(pruner.state_dict(), "pruner", enc)
    if optimizer is not None:
        shapes = [list(p.shape) for g in optimizer.param_groups for p in g["params"]]
        sections["optimizer"] = {"param_shapes": shapes,
                                 "state": encode(optimizer.state_dict(), "optimizer", enc)}
    if states:
        sections["states"] = {name: encode(obj.state_dict(), f"states/{name}", enc)
                              for name, obj in states.items()}
    if rng is not False:
        ranks = {0: rng_state()} if rng is True else rng
        sections["rng"] = {str(r): encode(dict(s), f"rng/{r}", enc) for r, s in ranks.items()}
    try:
        user_meta = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"meta must be JSON-serialisable, got {meta!r}: {err}") from None
    header = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                         "versions": dict(versions()), "meta": user_meta, "sections": sections},
                        allow_nan=False)
    digest = content_digest(header, enc.tensors)
    metadata = {"format": "pt", HEADER_KEY: header, HASH_KEY: digest}
    out = write_atomic(path, lambda tmp: safetensors.torch.save_file(enc.tensors, tmp, metadata))
    return CheckpointInfo(out, digest, dict(versions()), tuple(sections), user_meta)


# -- reading --------------------------------------------------------------------------------

def _read(path: str | os.PathLike[str],
          verify: bool = True) -> tuple[CheckpointInfo, dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    raw = read_header(path).get("__metadata__") or {}
    if HEADER_KEY not in raw or HASH_KEY not in raw:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a secateurs "
                              "checkpoint (no secateurs header)")
    header_text = raw[HEADER_KEY]
    try:
        header = json.loads(header_text)
    except ValueError:
        raise CheckpointError(f"checkpoint {str(path)!r} has a malformed JSON header") from None
    if header.get("format") != FORMAT or not isinstance(header.get("format_version"), int):
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} file")
    if header["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{header['format_version']}, written by a newer secateurs "
                              f"({header['versions']}); this one reads up to {FORMAT_VERSION}")
    tensors: dict[str, torch.Tensor] = {}
    if verify:
        try:
            tensors = safetensors.torch.load_file(path)
        except Exception as err:  # the Rust reader raises its own error type
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {err}") from None
        digest = content_digest(header_text, tensors)
        if digest != raw[HASH_KEY]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: content hash "
                                  f"{digest[:16]}... differs from the recorded "
                                  f"{raw[HASH_KEY][:16]}...")
    info = CheckpointInfo(path, raw[HASH_KEY], dict(header["versions"]),
                          tuple(header["sections"]), dict(header.get("meta") or {}))
    return info, header["sections"], tensors


def read_info(path: str | os.PathLike[str], *, verify: bool = True) -> CheckpointInfo:
    """Read a checkpoint's header (versions, hash, meta) without a model.

    Args:
        path: The file.
        verify: Also read every tensor and check the content hash.

    Raises:
        CheckpointError: for a truncated, corrupted or foreign file.
    """
    return _read(path, verify)[0]


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's names, shapes
    and dtypes (``what`` names the source in the message)."""
    live = model.state_dict()
    missing = [k for k in live if k not in state]
    extra = [k for k in state if k not in live]
    if missing or extra:
        raise CheckpointError(f"{what} does not fit the model: missing {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                              f"{'...' if len(extra) > 8 else ''}")
    bad = [f"{k}: {tuple(v.shape)} {v.dtype} in {what}, {tuple(live[k].shape)} "
           f"{live[k].dtype} in the model" for k, v in state.items()
           if isinstance(v, torch.Tensor)
           and (v.shape != live[k].shape or v.dtype != live[k].dtype)]
    if bad:
        raise CheckpointError(f"{what} does not fit the model: {'; '.join(bad[:8])}")


def _check_pruner(pruner: Pruner, masks: dict[str, torch.Tensor], where: str) -> None:
    missing = [n for n in pruner.masks if n not in masks]
    extra = [n for n in masks if n not in pruner.masks]
    bad = [f"{n}: {tuple(m.shape)} saved, {tuple(pruner.masks[n].shape)} live"
           for n, m in masks.items() if n in pruner.masks and m.shape != pruner.masks[n].shape]
    if missing or extra or bad:
        raise CheckpointError(f"{where}: pruner targets differ: missing {missing[:8]}, "
                              f"unexpected {extra[:8]}, other shapes {bad[:8]}")


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Any, where: str) -> None:
    live = [list(p.shape) for g in optimizer.param_groups for p in g["params"]]
    if saved != live:
        first = next(i for i in range(max(len(saved), len(live)) + 1)
                     if i >= min(len(saved), len(live)) or saved[i] != live[i])
        raise CheckpointError(
            f"{where}: the optimizer's parameters differ: {len(saved)} saved, {len(live)} live; "
            f"first difference at index {first}")


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    pruner: Pruner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    states: Mapping[str, Stateful] | None = None,
    rng: bool = True,
    rank: int | None = None,
) -> CheckpointInfo:
    """Restore a checkpoint written by :func:`save` into live objects, all or nothing.

    Everything that can be checked is checked before anything changes; if restoring a
    later part fails all the same, what was already restored is put back.

    Args:
        path: The file.
        model: Receives the weights and buffers (names, shapes and dtypes must match).
        pruner: Receives step, masks and criterion state (built with the same targets).
        optimizer: Receives its state (built over the same parameters, in the same order).
        states: Name -> object given to :func:`save` under the same name.
        rng: Restore the RNG states saved for this process's rank.
        rank: Which rank's RNG states to restore (default: this process's rank under
            ``torch.distributed``, else 0).

    Returns:
        The header (versions, hash, ``meta``).

    Raises:
        CheckpointError: (a ``ValueError``) for a truncated or corrupted file, a hash
            mismatch, or objects that do not fit it; nothing is changed.
        TypeError: if ``model`` is not an ``nn.Module``.
    """
    _check_types(model, pruner, optimizer)
    info, sections, tensors = _read(path)
    where = f"checkpoint {str(path)!r}"
    wanted = {"pruner": pruner, "optimizer": optimizer, "states": states, "rng": rng or None}
    absent = [name for name, obj in wanted.items() if obj is not None and name not in sections]
    if absent:
        raise CheckpointError(f"{where} holds no {', '.join(absent)} state; it holds "
                              f"{', '.join(sections)} (pass None / rng=False to skip)")
    model_state = decode(sections["model"], tensors)
    check_state_dict(model, model_state, where)
    plan: list[tuple[Stateful, Any]] = []
    if pruner is not None:
        pruner_state = decode(sections["pruner"], tensors)
        _check_pruner(pruner, pruner_state["masks"], where)
        plan.append((pruner, pruner_state))
    for name, obj in (states or {}).items():
        if name not in sections["states"]:
            raise CheckpointError(f"{where} holds no state named {name!r}; it holds "
                                  f"{sorted(sections['states'])}")
        plan.append((obj, decode(sections["states"][name], tensors)))
    if optimizer is not None:
        _check_optimizer(optimizer, sections["optimizer"]["param_shapes"], where)
        plan.append((optimizer, decode(sections["optimizer"]["state"], tensors)))
    rng_ranks = decode(sections["rng"], tensors) if rng else {}
    r = process_rank() if rank is None else rank
    if rng and str(r) not in rng_ranks:
        raise CheckpointError(f"{where} holds RNG states for ranks {sorted(rng_ranks)}, not "
                              f"for rank {r}; pass rng=False to keep the current ones")
    _apply(plan, model, model_state, rng_ranks.get(str(r)))
    return info


def _apply(plan: list[tuple[Stateful, Any]], model: nn.Module,
           model_state: Mapping[str, torch.Tensor], rng: Mapping[str, torch.Tensor] | None
           ) -> None:
    """Restore each object; on failure put back those already restored (the optimizer is
    last: its checks ran above, and copying its state for an undo would double memory)."""
    undo: list[Callable[[], Any]] = []
    try:
        for obj, state in plan:
            if isinstance(obj, Pruner):  # its state_dict is already a copy
                undo.append(functools.partial(obj.load_state_dict, obj.state_dict()))
            elif not isinstance(obj, torch.optim.Optimizer):
                undo.append(functools.partial(obj.load_state_dict,
                                              copy.deepcopy(obj.state_dict())))
            obj.load_state_dict(state)
        model.load_state_dict(model_state, strict=True)
        if rng is not None:
            set_rng_state(rng)
    except BaseException:
        for step in reversed(undo):
            # The original error is the one to report; an object that also refuses its
            # own previous state must not stop the others from being put back.
            with contextlib.suppress(Exception):
                step()
        raise
