"""Masks and their enforcement on weights, gradients and optimizer state.

A mask is a ``torch.bool`` tensor shaped like its target, ``True`` meaning kept. Weights
stay where they are: enforcement writes zeros in place with :func:`zero_masked_` (whose
only temporary is bounded), so the only memory kept is one byte per target weight.

Between mask changes, :class:`GradientMask` zeroes the masked entries of the gradients just
before each optimizer step. For an optimizer whose update of an entry reads only that
entry's gradient, weight and state (:data:`ELEMENTWISE_OPTIMIZERS`), a weight and a state
that are zero stay exactly zero under a zero gradient, so weights and optimizer state need
zeroing only when the masks change, and the optimization of the kept weights is, bit for
bit, the one of masking them at every step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .targets import Target

__all__ = ["ELEMENTWISE_OPTIMIZERS", "GradientMask", "MaskSet", "PrunedValues",
           "is_elementwise", "unwrap_optimizer", "zero_masked_"]

#: Optimizers whose update of an entry reads only that entry's gradient, weight and state,
#: and leaves a zero weight whose state was zeroed at zero under zero gradients: SGD (momentum,
#: Nesterov, dampening, L2 weight decay ``wd * w = 0``), Adam and AdamW (``m = v = 0``, so
#: ``m / (sqrt(v) + eps) = 0``; AMSGrad's maximum stays 0; decoupled decay ``w * (1 - lr *
#: wd) = 0``), NAdam, RAdam, Adamax, RMSprop (centred too), Adagrad, Adadelta, Rprop
#: (``sign(0) = 0``) and ASGD (Adamax's and Rprop's state then keep a positive floor there,
#: which moves nothing). Matched by exact type, since a subclass may change the update;
#: add a class of your own only if the same holds for it. Optimizers that mix entries
#: (L-BFGS, Muon, Shampoo) or factor their state (Adafactor) are not in it.
ELEMENTWISE_OPTIMIZERS: set[type[torch.optim.Optimizer]] = {
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
    torch.optim.Rprop, torch.optim.ASGD,
}

# Integers of each float width: a float seen as one keeps every bit under ``* 1`` and
# becomes all-zero bits, ``+0.0``, under ``* 0``.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# Elements per multiplication: the CPU kernel widens the mask's bytes to the integer width
# in a temporary first, which this bounds (4 MiB for float32); smaller chunks cost more in
# thread hand-offs than they save.
_CHUNK = 1 << 20


@torch.no_grad()
def zero_masked_(x: torch.Tensor, mask: torch.Tensor) -> None:
    """Set the entries of ``x`` where ``mask`` is ``False`` to ``+0.0``, in place.

    Bit for bit what ``torch.where(mask, x, 0, out=x)`` gives (NaN and Inf under the mask
    become zero, a kept ``-0.0`` stays). On a CPU, whose ``torch.where`` kernel for a bool
    condition is a scalar loop, a contiguous float tensor is instead seen as integers of
    its width and multiplied in place by the mask's bytes, a vectorised kernel about six
    times faster, in chunks that bound its temporary.

    Args:
        x: A tensor shaped like ``mask``, on its device.
        mask: A ``torch.bool`` tensor, ``True`` meaning kept.
    """
    bits = _BITS.get(x.element_size()) if x.is_floating_point() else None
    if bits is None or x.device.type != "cpu" or not (x.is_contiguous()
                                                      and mask.is_contiguous()):
        torch.where(mask, x, x.new_zeros(()), out=x)
        return
    flat, keep = x.view(-1).view(bits), mask.view(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        flat[start:start + _CHUNK].mul_(keep[start:start + _CHUNK])


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that does the update: the one a wrapper holds as ``.optimizer``
    (Accelerate's ``AcceleratedOptimizer``), or ``optimizer`` itself."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def is_elementwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether (the optimizer inside) ``optimizer`` is in :data:`ELEMENTWISE_OPTIMIZERS`."""
    return type(unwrap_optimizer(optimizer)) in ELEMENTWISE_OPTIMIZERS


class MaskSet(Mapping[str, torch.Tensor]):
    """Target name -> bool mask, with in-place enforcement.

    Each mask follows its parameter's device (:meth:`follow_`). :attr:`version` counts the
    mask replacements, so that code enforcing them knows when they changed.

    Args:
        targets: The managed parameters; every mask starts all ``True``.
    """

    def __init__(self, targets: list[Target]) -> None:
        self._targets = {t.name: t for t in targets}
        self._masks: dict[str, torch.Tensor] = {
            t.name: torch.ones_like(t.param, dtype=torch.bool) for t in targets
        }
        self._dense: set[str] = set(self._masks)
        self._version = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    @property
    def version(self) -> int:
        """How many times a mask was replaced (:meth:`set_`, :meth:`load_state_dict`)."""
        return self._version

    def is_dense(self, name: str) -> bool:
        """Whether the mask of ``name`` keeps everything (enforcement skips it)."""
        return name in self._dense

    def sparse_names(self) -> list[str]:
        """Names whose mask prunes something."""
        return [n for n in self._masks if n not in self._dense]

    def target(self, name: str) -> Target:
        """The managed parameter whose mask is ``name``."""
        return self._targets[name]

    def set_(self, name: str, mask: torch.Tensor) -> None:
        """Replace the mask of ``name`` (validated: bool, same shape; moved to the device
        of its parameter)."""
        old = self._masks[name]
        if mask.dtype != torch.bool or mask.shape != old.shape:
            raise ValueError(
                f"mask for {name!r} must be torch.bool of shape {tuple(old.shape)}, got "
                f"{mask.dtype} of shape {tuple(mask.shape)}"
            )
        # A copy: a caller editing its tensor later must not change what is enforced.
        self._masks[name] = mask.to(self._targets[name].param.device, copy=True)
        if bool(mask.all()):
            self._dense.add(name)
        else:
            self._dense.discard(name)
        self._version += 1

    def follow_(self) -> None:
        """Move each mask to its parameter's device, where the parameter moved (a model
        sent to an accelerator after the masks were made)."""
        for name, mask in self._masks.items():
            device = self._targets[name].param.device
            if mask.device != device:
                self._masks[name] = mask.to(device)

    @torch.no_grad()
    def apply_(self, names: Iterable[str] | None = None) -> None:
        """Zero every masked weight in place (of the targets ``names``, or of all)."""
        for name in self._masks if names is None else names:
            if name not in self._dense:
                zero_masked_(self._targets[name].param, self._masks[name])

    @torch.no_grad()
    def apply_to_optimizer_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the masked entries of every optimizer state tensor shaped like its target.

        Covers SGD's ``momentum_buffer``, Adam/AdamW's ``exp_avg``, ``exp_avg_sq`` and
        ``max_exp_avg_sq``, and any other per-element state, so nothing regrows by accident.
        """
        for name, mask in self._masks.items():
            if name in self._dense:
                continue
            state = optimizer.state.get(self._targets[name].param)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    zero_masked_(value, mask)

    @torch.no_grad()
    def apply_to_gradients_(self) -> None:
        """Zero the masked entries of every target's ``.grad`` (where it has one of the
        mask's shape; a compacted parameter no longer fits its mask)."""
        for name in self._masks:
            if name in self._dense:
                continue
            grad = self._targets[name].param.grad
            mask = self._masks[name]
            if grad is not None and grad.shape == mask.shape:
                zero_masked_(grad, mask if mask.device == grad.device else mask.to(grad.device))

    def sparsity(self, names: Iterable[str] | None = None) -> float:
        """Fraction of masked elements over all targets, or over the targets ``names``."""
        masks = list(self._masks.values()) if names is None else [self._masks[n] for n in names]
        total = sum(m.numel() for m in masks)
        kept = sum(int(m.sum()) for m in masks)
        return 1.0 - kept / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the masks, keyed by target name."""
        return {name: m.clone() for name, m in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore masks; names must match the targets exactly. Validates before changing."""
        _check_like("mask", state, self._masks)
        for name, mask in state.items():
            self.set_(name, mask.clone())


class GradientMask:
    """Zeroes the masked entries of the gradients right before each step of one optimizer.

    A step pre-hook on the optimizer (the one inside a wrapper, see
    :func:`unwrap_optimizer`) calls :meth:`MaskSet.apply_to_gradients_`; when the step is
    given a closure (as Lightning does: the closure runs the forward and backward pass inside
    ``optimizer.step``), the closure is wrapped so the gradients are masked after it runs.
    So it holds under gradient accumulation (masked once per step, on the sum), gradient
    clipping (which sees the gradients as without it), ``zero_grad(set_to_none=True)``,
    frozen parameters and parameters without a gradient in a step (skipped). Nothing is
    kept on the model's parameters: copies of the model carry nothing of it.

    Args:
        masks: The masks to apply.
        optimizer: The optimizer whose steps are preceded by the masking.
    """

    def __init__(self, masks: MaskSet, optimizer: torch.optim.Optimizer) -> None:
        self.masks = masks
        self.optimizer = optimizer
        self._inner = unwrap_optimizer(optimizer)
        handle = self._inner.register_step_pre_hook(_before_step(weakref.ref(self)))
        self._handle: Any = handle
        weakref.finalize(self, handle.remove)  # a forgotten mask leaves no hook behind

    def close(self) -> None:
        """Remove the hook from the optimizer."""
        self._handle.remove()

    def covered(self) -> set[str]:
        """Names of the masks whose parameter (as the model holds it now) the optimizer
        updates; gradients of others may be applied by someone else."""
        ids = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        return {n for n in self.masks if id(self.masks.target(n).param) in ids}

    def _prepare(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if optimizer is not self._inner:  # a copy of the optimizer carries the hook along
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.masks.apply_to_gradients_()
            return None
        masked = _masked_closure(closure, self.masks)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": masked}
        return (args[0], masked, *args[2:]), kwargs


def _before_step(ref: weakref.ReferenceType[GradientMask]) -> Callable[..., Any]:
    # A weak reference: the optimizer must not keep the masks (and the pruner) alive.
    def hook(optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        owner = ref()
        return None if owner is None else owner._prepare(optimizer, args, kwargs)
    return hook


def _masked_closure(closure: Callable[[], Any], masks: MaskSet) -> Callable[[], Any]:
    def masked() -> Any:
        loss = closure()
        masks.apply_to_gradients_()
        return loss
    return masked


class PrunedValues:
    """What each pruned weight would be had it not been zeroed: the dense ``W`` of Dynamic
    Network Surgery (Guo et al. 2016), one float buffer per target (4 bytes per weight).

    A pruned weight is zero before every optimizer step, so right after it the weight holds
    exactly that step's update; :meth:`accumulate_` adds it to the buffer. The pruned weight
    thus keeps training behind its mask and comes back, with its accumulated value, once that
    value crosses the regrowth threshold. Entries of kept weights mean nothing between
    updates: :meth:`restore_` reads the buffer only where the mask is off.
    """

    def __init__(self, masks: MaskSet, names: list[str]) -> None:
        self._masks = masks
        self._values = {n: masks.target(n).param.detach().clone() for n in names}

    @torch.no_grad()
    def accumulate_(self) -> None:
        """Add this step's update of every pruned weight (call before enforcement)."""
        for name, values in self._values.items():
            if not self._masks.is_dense(name):
                p = self._masks.target(name).param
                if values.device != p.device:  # the model moved since
                    values = self._values[name] = values.to(p.device)
                values.add_(p)

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the accumulated values of pruned weights back in place, before scoring."""
        for name, values in self._values.items():
            if not self._masks.is_dense(name):
                p = self._masks.target(name).param
                torch.where(self._masks[name], p, values, out=p)

    @torch.no_grad()
    def record_(self) -> None:
        """Remember the current (dense) values, before the new masks zero them."""
        for name, values in self._values.items():
            values.copy_(self._masks.target(name).param)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the buffers, keyed by target name."""
        return {name: v.clone() for name, v in self._values.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore buffers; names, shapes and dtypes must match. Validates before changing."""
        _check_like("pruned values", state, self._values)
        for name, v in state.items():
            self._values[name].copy_(v)


def _check_like(kind: str, state: Mapping[str, torch.Tensor],
                current: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``state`` has the names, shapes and dtypes of ``current``."""
    if set(state) != set(current):
        missing = sorted(set(current) - set(state))
        extra = sorted(set(state) - set(current))
        raise ValueError(f"{kind} names do not match the targets: missing {missing}, "
                         f"unexpected {extra}")
    for name, value in state.items():
        old = current[name]
        if value.dtype != old.dtype or value.shape != old.shape:
            raise ValueError(f"{kind} for {name!r} must be {old.dtype} of shape "
                             f"{tuple(old.shape)}, got {value.dtype} {tuple(value.shape)}")
