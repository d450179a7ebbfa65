"""Masks and their enforcement on weights and optimizer state.

A mask is a ``torch.bool`` tensor shaped like its target, ``True`` meaning kept. Weights
stay where they are: enforcement writes zeros in place with ``torch.where(mask, w, 0,
out=w)``, which allocates nothing (``w.mul_(mask)`` would materialise a float copy of the
mask on every call), so the only memory added is one byte per target weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from .targets import Target


class MaskSet(Mapping[str, torch.Tensor]):
    """Target name -> bool mask, with in-place enforcement.

    Args:
        targets: The managed parameters; every mask starts all ``True``.
    """

    def __init__(self, targets: list[Target]) -> None:
        self._targets = {t.name: t for t in targets}
        self._masks: dict[str, torch.Tensor] = {
            t.name: torch.ones_like(t.param, dtype=torch.bool) for t in targets
        }
        self._zero = {t.name: t.param.new_zeros(()) for t in targets}
        self._dense: set[str] = set(self._masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def is_dense(self, name: str) -> bool:
        """Whether the mask of ``name`` keeps everything (enforcement skips it)."""
        return name in self._dense

    def target(self, name: str) -> Target:
        """The managed parameter whose mask is ``name``."""
        return self._targets[name]

    def set_(self, name: str, mask: torch.Tensor) -> None:
        """Replace the mask of ``name`` (validated: bool, same shape and device)."""
        old = self._masks[name]
        if mask.dtype != torch.bool or mask.shape != old.shape:
            raise ValueError(
                f"mask for {name!r} must be torch.bool of shape {tuple(old.shape)}, got "
                f"{mask.dtype} of shape {tuple(mask.shape)}"
            )
        # A copy: a caller editing its tensor later must not change what is enforced.
        self._masks[name] = mask.to(old.device, copy=True)
        if bool(mask.all()):
            self._dense.add(name)
        else:
            self._dense.discard(name)

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight in place."""
        for name, mask in self._masks.items():
            if name not in self._dense:
                p = self._targets[name].param
                torch.where(mask, p, self._zero[name], out=p)

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
            zero = self._zero[name]
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    z = zero if value.dtype == zero.dtype else value.new_zeros(())
                    torch.where(mask, value, z, out=value)

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
                values.add_(self._masks.target(name).param)

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
