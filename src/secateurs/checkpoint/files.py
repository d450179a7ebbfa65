"""Saving and loading checkpoint files: what goes in, and the checks before anything changes.

Loading reads one open file. Its header is checked first, then every shape and dtype it
declares against the live model, pruner, optimizer and RNG (on ``meta`` tensors, so a
crafted size allocates nothing); only then are the tensor bytes read and the content hash
verified, and the values checked (finite statistics and learning rates, RNG states the
generators accept) before anything is restored.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..pruner import Pruner
from ..targets import unwrap_compiled
from . import container
from .atomic import write_atomic_stream
from .codec import Encoder, decode, encode
from .digest import content_digest
from .header import (
    FORMAT,
    FORMAT_VERSION,
    HASH_KEY,
    HEADER_KEY,
    CheckpointError,
    CheckpointInfo,
    versions,
)
from .rng import check_rng_state, process_rank, rng_state, set_rng_state

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
    criterion_states: Mapping[int, Mapping[str, Any]] | None = None,
) -> CheckpointInfo:
    """Write a checkpoint atomically: weights, masks, optimizer, schedules, controllers, RNG.

    Args:
        path: Destination file (conventionally ``*.safetensors``); replaced atomically.
            Temporary files that killed saves to it left behind are removed.
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
        criterion_states: Rank -> that rank's ``pruner.criterion.state_dict()``, for
            criteria whose statistics differ between ranks (see
            :func:`~secateurs.checkpoint.save_distributed`); :func:`load` gives each rank
            its own.

    Returns:
        The header of what was written.

    Raises:
        TypeError: if some state holds a value that cannot be saved (nothing is written).
        OSError: if the file cannot be written (disk full, I/O error, permissions); the
            previous file at ``path`` is intact.
    """
    _check_types(model, pruner, optimizer)
    model = unwrap_compiled(model)  # the names of the module, compiled or not
    enc = Encoder()
    sections: dict[str, Any] = {"model": encode(model.state_dict(), "model", enc)}
    if pruner is not None:
        sections["pruner"] = encode(pruner.state_dict(), "pruner", enc)
    if pruner is not None and criterion_states:
        sections["criteria"] = {str(r): encode(dict(s), f"criteria/{r}", enc)
                                for r, s in criterion_states.items()}
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
    out = write_atomic_stream(
        path, lambda f: container.write_tensors(f, enc.tensors, metadata))
    return CheckpointInfo(out, digest, dict(versions()), tuple(sections), user_meta)


# -- reading --------------------------------------------------------------------------------

@contextlib.contextmanager
def _malformed(where: str) -> Iterator[None]:
    """Report what a crafted or damaged file makes the checks trip over as a
    :class:`CheckpointError` naming the file."""
    try:
        yield
    except CheckpointError as err:
        if where in str(err):
            raise
        raise CheckpointError(f"{where}: {err}") from None
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None
    except (KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError,
            MemoryError) as err:
        raise CheckpointError(f"{where} is malformed: {type(err).__name__}: {err}") from None


@dataclass(frozen=True)
class _Header:
    info: CheckpointInfo
    text: str
    sections: dict[str, Any]
    layout: container.Layout


def _header(f: io.BufferedReader, path: Path) -> _Header:
    """The checkpoint header of the file open as ``f`` (no tensor is read)."""
    layout = container.read_layout(f, path)
    raw = layout.metadata
    if HEADER_KEY not in raw or HASH_KEY not in raw:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a secateurs "
                              "checkpoint (no secateurs header)")
    text = raw[HEADER_KEY]
    where = f"checkpoint {str(path)!r}"
    header = container.parse_json(text, where, "JSON header")
    if not isinstance(header, dict) or header.get("format") != FORMAT \
            or not isinstance(header.get("format_version"), int):
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} file")
    if header["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{where} has format version {header['format_version']}, "
                              f"written by a newer secateurs ({header.get('versions')}); "
                              f"this one reads up to {FORMAT_VERSION}")
    with _malformed(where):
        sections = header["sections"]
        if not isinstance(sections, dict) or not isinstance(sections.get("model"), dict):
            raise CheckpointError(f"{where} is malformed: it has no model section")
        info = CheckpointInfo(path, raw[HASH_KEY],
                              {str(k): str(v) for k, v in dict(header["versions"]).items()},
                              tuple(sections), dict(header.get("meta") or {}))
    return _Header(info, text, sections, layout)


def _tensors(f: io.BufferedReader, head: _Header, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, after checking the content hash."""
    tensors = container.read_tensors(f, head.layout, path)
    digest = content_digest(head.text, tensors)
    if digest != head.info.sha256:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: content hash "
                              f"{digest[:16]}... differs from the recorded "
                              f"{head.info.sha256[:16]}...")
    return tensors


def read_info(path: str | os.PathLike[str], *, verify: bool = True) -> CheckpointInfo:
    """Read a checkpoint's header (versions, hash, meta) without a model.

    Args:
        path: The file.
        verify: Also read every tensor and check the content hash.

    Raises:
        CheckpointError: for a truncated, corrupted or foreign file.
    """
    path = Path(path)
    with container.open_regular(path) as f:
        head = _header(f, path)
        if verify:
            _tensors(f, head, path)
    return head.info


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's names, shapes
    and dtypes (``what`` names the source in the message)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} does not fit the model: its state is a "
                              f"{type(state).__name__}, not a mapping")
    live = model.state_dict()
    missing = [k for k in live if k not in state]
    extra = [k for k in state if k not in live]
    if missing or extra:
        raise CheckpointError(f"{what} does not fit the model: missing {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                              f"{'...' if len(extra) > 8 else ''}")
    bad = [f"{k}: {_shown(v)} in {what}, {tuple(live[k].shape)} {live[k].dtype} in the model"
           for k, v in state.items() if isinstance(live[k], torch.Tensor)
           and (not isinstance(v, torch.Tensor) or v.shape != live[k].shape
                or v.dtype != live[k].dtype)]
    if bad:
        raise CheckpointError(f"{what} does not fit the model: {'; '.join(bad[:8])}")


def _shown(v: object) -> str:
    return f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__


def _check_pruner(pruner: Pruner, state: Any, where: str) -> None:
    if not isinstance(state, dict) or not isinstance(state.get("masks"), dict):
        raise CheckpointError(f"{where}: malformed pruner state")
    masks = state["masks"]
    missing = [n for n in pruner.masks if n not in masks]
    extra = [n for n in masks if n not in pruner.masks]
    bad = [f"{n}: {_shown(m)} saved, {tuple(pruner.masks[n].shape)} live"
           for n, m in masks.items() if n in pruner.masks
           and (not isinstance(m, torch.Tensor) or m.shape != pruner.masks[n].shape)]
    if missing or extra or bad:
        raise CheckpointError(f"{where}: pruner targets differ: missing {missing[:8]}, "
                              f"unexpected {extra[:8]}, other shapes {bad[:8]}")
    try:
        pruner.check_state_dict(state)
    except ValueError as err:
        raise CheckpointError(f"{where}: the pruner's state does not fit: {err}") from None


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Any, where: str) -> None:
    live = [list(p.shape) for g in optimizer.param_groups for p in g["params"]]
    if not isinstance(saved, list):
        raise CheckpointError(f"{where}: malformed optimizer section")
    if saved != live:
        first = next(i for i in range(max(len(saved), len(live)) + 1)
                     if i >= min(len(saved), len(live)) or saved[i] != live[i])
        raise CheckpointError(
            f"{where}: the optimizer's parameters differ: {len(saved)} saved, {len(live)} live; "
            f"first difference at index {first}")


# Optimizers whose per-parameter state tensors are scalars or shaped like the parameter.
_ELEMENTWISE = tuple(getattr(torch.optim, n) for n in (
    "SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam",
    "RMSprop", "Rprop", "SparseAdam") if hasattr(torch.optim, n))


def _check_hyper(group: dict[str, Any], live: dict[str, Any], i: int, where: str) -> None:
    """Learning rates finite and >= 0, no NaN hyper-parameter: refused at load, not at the
    next step."""
    if "lr" in live:
        lr = group.get("lr")
        value: object = lr
        if isinstance(lr, torch.Tensor):  # a tensor learning rate (capturable optimizers)
            value = float("nan") if lr.numel() != 1 else \
                0.0 if lr.device.type == "meta" else float(lr)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise CheckpointError(f"{where}: optimizer group {i} has learning rate {lr!r}; "
                                  "it must be a finite number >= 0")
    for key, v in group.items():
        values = v if isinstance(v, (list, tuple)) and key != "params" else [v]
        if any(isinstance(x, float) and math.isnan(x) for x in values):
            raise CheckpointError(f"{where}: optimizer group {i} has {key} = {v!r}")


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, where: str) -> None:
    """The saved ``optimizer.state_dict()`` must have the live groups' sizes, and state
    tensors the shapes the live optimizer would give them."""
    groups, state = (saved.get("param_groups"), saved.get("state")) \
        if isinstance(saved, dict) else (None, None)
    live_groups = optimizer.param_groups
    if not isinstance(groups, list) or not isinstance(state, dict) \
            or len(groups) != len(live_groups) \
            or any(not isinstance(g, dict) or not isinstance(g.get("params"), list)
                   or len(g["params"]) != len(lg["params"])
                   for g, lg in zip(groups, live_groups, strict=False)):
        raise CheckpointError(f"{where}: the optimizer's state does not fit its parameter "
                              "groups")
    params: dict[Any, torch.Tensor] = {}
    for i, (g, lg) in enumerate(zip(groups, live_groups, strict=True)):
        _check_hyper(g, lg, i, where)
        params.update(zip(g["params"], lg["params"], strict=True))
    elementwise = type(optimizer) in _ELEMENTWISE
    for index, values in state.items():
        if index not in params or not isinstance(values, dict):
            raise CheckpointError(f"{where}: optimizer state for parameter {index!r}, which "
                                  "its groups do not list")
        p = params[index]
        live = optimizer.state.get(p, {})
        for key, v in values.items():
            if not isinstance(v, torch.Tensor):
                continue
            if isinstance(live.get(key), torch.Tensor):
                want = live[key].shape
            elif elementwise and v.dim() > 0:
                want = p.shape
            else:
                continue
            if v.shape != want:
                raise CheckpointError(
                    f"{where}: optimizer state {key!r} of parameter {index} has shape "
                    f"{tuple(v.shape)}, expected {tuple(want)} (parameter {tuple(p.shape)})")


@dataclass
class _Staged:
    """What :func:`load` restores, decoded and checked."""

    model: Mapping[str, torch.Tensor]
    plan: list[tuple[Stateful, Any]]
    rng: Mapping[str, torch.Tensor] | None


def _stage(sections: dict[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module,
           pruner: Pruner | None, optimizer: torch.optim.Optimizer | None,
           states: Mapping[str, Stateful] | None, rank: int, rng: bool, where: str) -> _Staged:
    """Decode the sections and check each against its live object. Run twice: on ``meta``
    tensors (shapes only, before any byte is read), then on the tensors read."""
    model_state = decode(sections["model"], tensors)
    check_state_dict(model, model_state, where)
    plan: list[tuple[Stateful, Any]] = []
    if pruner is not None:
        pruner_state = decode(sections["pruner"], tensors)
        ranks = sections.get("criteria")
        if isinstance(pruner_state, dict) and isinstance(ranks, dict) and str(rank) in ranks:
            pruner_state["criterion"] = decode(ranks[str(rank)], tensors)
        _check_pruner(pruner, pruner_state, where)
        plan.append((pruner, pruner_state))
    for name, obj in (states or {}).items():
        if name not in sections["states"]:
            raise CheckpointError(f"{where} holds no state named {name!r}; it holds "
                                  f"{sorted(sections['states'])}")
        plan.append((obj, decode(sections["states"][name], tensors)))
    if optimizer is not None:
        _check_optimizer(optimizer, sections["optimizer"]["param_shapes"], where)
        optimizer_state = decode(sections["optimizer"]["state"], tensors)
        _check_optimizer_state(optimizer, optimizer_state, where)
        plan.append((optimizer, optimizer_state))
    rng_state_ = None
    if rng:
        rng_ranks = decode(sections["rng"], tensors)
        if not isinstance(rng_ranks, dict) or str(rank) not in rng_ranks:
            held = sorted(rng_ranks) if isinstance(rng_ranks, dict) else []
            raise CheckpointError(f"{where} holds RNG states for ranks {held}, not for rank "
                                  f"{rank}; pass rng=False to keep the current ones")
        rng_state_ = rng_ranks[str(rank)]
        check_rng_state(rng_state_, where, values=not any(t.is_meta for t in tensors.values()))
    return _Staged(model_state, plan, rng_state_)


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

    Everything that can be checked is checked before anything changes: the file's size
    and layout, every declared shape against the live objects (before any tensor is
    read, so a crafted file cannot make this allocate more than it holds), the content
    hash, the optimizer's state shapes and learning rates, the criterion's statistics
    (shapes, finite values), the RNG states. If restoring a later part fails all the
    same, what was already restored is put back.

    Args:
        path: The file.
        model: Receives the weights and buffers (names, shapes and dtypes must match).
        pruner: Receives step, masks and criterion state (built with the same targets).
            A file written by :func:`~secateurs.checkpoint.save_distributed` holds each
            rank's criterion state; this rank's is restored (the writing rank's for a rank
            the file has none for).
        optimizer: Receives its state (built over the same parameters, in the same order).
        states: Name -> object given to :func:`save` under the same name.
        rng: Restore the RNG states saved for this process's rank.
        rank: Which rank's RNG and criterion states to restore (default: this process's
            rank under ``torch.distributed``, else 0).

    Returns:
        The header (versions, hash, ``meta``).

    Raises:
        CheckpointError: (a ``ValueError``) for a truncated, corrupted, malformed or
            foreign file, a path that is not a regular file, a hash mismatch, or objects
            that do not fit it; nothing is changed.
        TypeError: if ``model`` is not an ``nn.Module``.
    """
    _check_types(model, pruner, optimizer)
    model = unwrap_compiled(model)
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    r = process_rank() if rank is None else rank
    with container.open_regular(path) as f:
        head = _header(f, path)
        sections = head.sections
        wanted = {"pruner": pruner, "optimizer": optimizer, "states": states,
                  "rng": rng or None}
        absent = [name for name, obj in wanted.items()
                  if obj is not None and name not in sections]
        if absent:
            raise CheckpointError(f"{where} holds no {', '.join(absent)} state; it holds "
                                  f"{', '.join(sections)} (pass None / rng=False to skip)")
        with _malformed(where):
            _stage(sections, head.layout.shapes(), model, pruner, optimizer, states, r, rng,
                   where)
        tensors = _tensors(f, head, path)
    with _malformed(where):
        staged = _stage(sections, tensors, model, pruner, optimizer, states, r, rng, where)
    _apply(staged.plan, model, staged.model, staged.rng)
    return head.info


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
