"""Calibration passes: run sample batches through a model and collect statistics.

A batch is what the model takes: a tensor (``model(x)``), a tuple or list of positional
arguments (``model(*batch)``) or a mapping of keyword arguments (``model(**batch)``, as
Hugging Face models take a tokenizer's output). Hooks are attached for the pass only and
are removed on every exit, also when the model raises.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..targets import Target, TargetSpec, resolve_targets
from .features import FeatureMap, feature_map
from .stats import DEFAULT_POWERS, InputStats

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

_EMPTY = ("calibration yielded no batches; pass a non-empty iterable of batches (tensors, "
          "tuples of positional arguments, or dicts of keyword arguments)")


# -- batches ---------------------------------------------------------------------------------

@dataclass
class Call:
    """One call of a module, recorded: ``module(*args, **kwargs)``.

    A batch of this kind is what the layer-wise pipeline replays into one block
    (:mod:`secateurs.calibration.pipeline`); any calibration pass accepts it.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _call_call(model: nn.Module, batch: Batch) -> Any:
    return model(*batch.args, **batch.kwargs)


def _call_mapping(model: nn.Module, batch: Batch) -> Any:
    return model(**batch)


def _call_sequence(model: nn.Module, batch: Batch) -> Any:
    return model(*batch)


def _call_tensor(model: nn.Module, batch: Batch) -> Any:
    return model(batch)


# Checked in order: a tokenizer's BatchEncoding is a Mapping, a namedtuple is a tuple.
_CALLERS: tuple[tuple[type | tuple[type, ...], Callable[[nn.Module, Batch], Any]], ...] = (
    (Call, _call_call),
    (Mapping, _call_mapping),
    ((tuple, list), _call_sequence),
    (torch.Tensor, _call_tensor),
)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor inside it (nested tuples, lists, mappings) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Call):
        return Call(to_device(batch.args, device), to_device(batch.kwargs, device))
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def run_batch(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one batch: ``model(**b)`` for a mapping, ``model(*b)`` for a tuple or
    list, ``model(b)`` for a tensor, ``model(*b.args, **b.kwargs)`` for a :class:`Call`.

    Raises:
        TypeError: for any other kind of batch.
    """
    for kind, call in _CALLERS:
        if isinstance(batch, kind):
            return call(model, batch)
    raise TypeError(f"a calibration batch must be a tensor, a tuple/list of positional "
                    f"arguments or a mapping of keyword arguments, got {type(batch).__name__}")


def describe(batch: Batch) -> str:
    """A short description of a batch for error messages: kinds and shapes."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, Call):
        return f"call{describe(batch.args)} with {describe(batch.kwargs)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in batch) + ")"
    return type(batch).__name__


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next(itertools.chain(model.parameters(), model.buffers()),
                torch.empty(0)).device


def check_batches(batches: object) -> Iterable[Batch]:
    """Return ``batches`` if it is an iterable of batches, else raise ``TypeError``."""
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"calibration must be an iterable of batches, got {type(batches).__name__}; wrap a "
            "single batch in a list ([x]) or split a tensor (x.split(32))"
        )
    return batches


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout, frozen normalisation statistics), then restore
    each submodule's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _progress(batches: Iterable[Batch], progress: bool, desc: str) -> Iterable[Batch]:
    total = len(batches) if isinstance(batches, Sequence) else None
    return tqdm(batches, desc=desc, total=total, disable=not progress, leave=False)


def _run_all(model: nn.Module, batches: Iterable[Batch], progress: bool, desc: str,
             step: Callable[[Batch], None]) -> int:
    """Call ``step`` on every batch (moved to the model's device); returns the batch count.

    Raises:
        ValueError: when the model raises on a batch (naming it), or there is no batch.
    """
    device = model_device(model)
    n = 0
    for i, batch in enumerate(_progress(check_batches(batches), progress, desc)):
        try:
            step(to_device(batch, device))
        except _Stop:
            pass
        except Exception as exc:
            raise ValueError(f"the model raised on calibration batch {i} ({describe(batch)}): "
                             f"{type(exc).__name__}: {exc}") from exc
        n += 1
    if n == 0:
        raise ValueError(_EMPTY)
    return n


class _Stop(Exception):
    """Ends a forward pass early, once every statistic of the pass has been collected."""


def input_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input of a layer call as a forward pre-hook sees it: its first tensor argument."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("a target layer was called without a tensor input")


def _targets(model: nn.Module, targets: TargetSpec | Sequence[Target]) -> list[Target]:
    if isinstance(targets, Sequence) and targets and all(isinstance(t, Target) for t in targets):
        return list(targets)  # type: ignore[arg-type]
    return resolve_targets(model, targets)  # type: ignore[arg-type]


# -- passes ----------------------------------------------------------------------------------

def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: TargetSpec | Sequence[Target] = None,
    *,
    hessian: bool = False,
    powers: Sequence[float] = DEFAULT_POWERS,
    progress: bool = True,
    stop_before: Sequence[Target] = (),
) -> dict[str, InputStats]:
    """Run ``batches`` through ``model`` (eval mode, no gradients) and collect, for every
    target, streaming statistics of the input features its weight multiplies.

    Args:
        model: The model; its weights are not changed.
        batches: An iterable of batches: tensors, tuples/lists of positional arguments, or
            mappings of keyword arguments. Read once, batch by batch.
        targets: Which layers (see :func:`secateurs.targets.resolve_targets`), or resolved
            :class:`~secateurs.targets.Target` objects.
        hessian: Also accumulate ``X^T X`` (``F x F`` per target) for reconstruction.
        powers: Powers ``p`` of the per-feature sums ``sum_n |x_nj|^p`` (1 and 2 always).
        progress: Show a progress bar.
        stop_before: Layers whose forward call ends a pass early once every target has seen
            its input (sequential calibration: the rest of the model is not needed).

    Returns:
        Target name -> :class:`InputStats`.

    Raises:
        ValueError: for an empty iterable, a batch on which the model raises, a target that
            received no input, or non-finite statistics.
        TypeError: for a target whose layer type has no registered feature map.
    """
    resolved = _targets(model, targets)
    maps = {t.name: feature_map(t.name, t.module) for t in resolved}
    stats = {t.name: InputStats.empty(t.row_shape[1:].numel(), powers, hessian, t.param.device)
             for t in resolved}
    seen: set[str] = set()

    def record(t: Target, fmap: FeatureMap) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = input_tensor(args, kwargs)
            sums, n = fmap.power_sums(module, x, list(stats[t.name].power_sums))
            stats[t.name].add(sums, n, fmap.patches(module, x) if hessian else None)
            seen.add(t.name)
        return hook

    def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(seen) == len(stats):
            raise _Stop

    handles = [t.module.register_forward_pre_hook(record(t, maps[t.name]), with_kwargs=True)
               for t in resolved]
    handles += [t.module.register_forward_pre_hook(stop, with_kwargs=True)
                for t in stop_before if t.name not in stats]

    def step(batch: Batch) -> None:
        seen.clear()
        run_batch(model, batch)

    try:
        with torch.no_grad(), eval_mode(model):
            _run_all(model, batches, progress, "calibration", step)
    finally:
        for h in handles:
            h.remove()
    _check(stats)
    return stats


def _check(stats: Mapping[str, InputStats]) -> None:
    silent = [name for name, s in stats.items() if s.count == 0]
    if silent:
        raise ValueError(f"targets {silent} received no input during calibration: their "
                         "layer's forward is never called (a parent may read the weight "
                         "directly, as nn.MultiheadAttention does with out_proj)")
    bad = [name for name, s in stats.items() if not s.is_finite()]
    if bad:
        raise ValueError(f"targets {bad} saw NaN or Inf inputs during calibration; check the "
                         "batches and the weights upstream of them")


def gradient_sums(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: Sequence[Target],
    loss: LossFn,
    *,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over batches of ``|dL_b/dw|`` per target element (eval mode).

    ``loss(model, batch)`` returns the scalar loss of one batch. Gradients come from
    ``torch.autograd.grad`` on the targets only, so the parameters' ``.grad`` fields are
    left as they were.

    Returns:
        Target name -> float32 tensor shaped like the target, and the number of batches.

    Raises:
        ValueError: for an empty iterable, a batch on which ``loss`` raises or returns a
            non-scalar or non-finite value.
    """
    sums = {t.name: torch.zeros_like(t.param, dtype=torch.float32) for t in targets}
    params = [t.param for t in targets]

    def step(batch: Batch) -> None:
        value = loss(model, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 \
                or not value.requires_grad or not bool(torch.isfinite(value)):
            raise ValueError("loss(model, batch) must return a finite scalar tensor that "
                             f"depends on the weights, got {value!r}")
        grads = torch.autograd.grad(value, params, allow_unused=True)
        for t, g in zip(targets, grads, strict=True):
            if g is not None:
                sums[t.name].add_(g.detach().abs().float())

    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)  # frozen targets still get a score
        with torch.enable_grad(), eval_mode(model):
            n = _run_all(model, batches, progress, "gradients", step)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return sums, n


def call_order(model: nn.Module, targets: Sequence[Target], batches: Iterable[Batch]
               ) -> list[str]:
    """Names of ``targets`` in the order their layers are first called, on the first batch.

    Targets whose layer is not called on that batch are left out.

    Raises:
        ValueError: if there is no batch, or the model raises on it.
    """
    order: list[str] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in order:
                order.append(name)
        return hook

    handles = [t.module.register_forward_pre_hook(record(t.name)) for t in targets]
    try:
        with torch.no_grad(), eval_mode(model):
            _run_all(model, itertools.islice(check_batches(batches), 1), False, "order",
                     lambda b: run_batch(model, b))
    finally:
        for h in handles:
            h.remove()
    return order
