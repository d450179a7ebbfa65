"""What every framework callback holds: how to build the pruner, the pruner once built, the
controller it feeds, and the figures it logs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..pruner import Pruner, SparsitySpec


class Session:
    """A pruner built when training starts, stepped after each optimizer step.

    Args:
        sparsity: The pruner's ``sparsity`` (a float, a schedule, a mapping).
        criterion: The pruner's ``criterion``.
        controller: Fed the evaluation metrics (anything with ``observe(metrics)``, e.g.
            :class:`~secateurs.controllers.Budget` or
            :class:`~secateurs.controllers.Plateau`); one with ``attach(pruner)`` (a
            ``Budget``) is attached to the pruner when it is built. Saved and restored with
            the pruner (``state_dict`` / ``load_state_dict``).
        options: Further keyword arguments of :class:`~secateurs.Pruner` (``scope``,
            ``granularity``, ``update_every``, ``targets``, ...).
    """

    def __init__(self, sparsity: SparsitySpec, criterion: Any, controller: Any,
                 options: Mapping[str, Any]) -> None:
        if controller is not None and not callable(getattr(controller, "observe", None)):
            raise TypeError(f"controller must have an observe(metrics) method (a Budget, a "
                            f"Plateau), got {type(controller).__name__}")
        if "optimizer" in options:
            raise TypeError("the optimizer is the framework's: do not pass optimizer=")
        self.sparsity, self.criterion, self.controller = sparsity, criterion, controller
        self.options = dict(options)
        self.pruner: Pruner | None = None
        self._pending: Mapping[str, Any] | None = None  # a state restored before the build
        self._logged: tuple[int, float] | None = None  # (mask version, realised sparsity)

    def build(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Pruner:
        """Build the pruner (and attach the controller), then restore a pending state. A
        pruner built before (an earlier ``train()``) is closed first: its hooks go."""
        if self.pruner is not None:
            self.pruner.close()
        self.pruner = Pruner(model, self.sparsity, self.criterion, optimizer=optimizer,
                             **self.options)
        attach = getattr(self.controller, "attach", None)
        if callable(attach):
            attach(self.pruner)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        return self.pruner

    def step(self) -> bool:
        """``pruner.step()``: right after an optimizer step."""
        return self.built().step()

    def built(self) -> Pruner:
        if self.pruner is None:
            raise RuntimeError("the pruner is built when training starts; no training has")
        return self.pruner

    def logs(self) -> dict[str, float]:
        """``sparsity`` (realised, over all targets) and ``target_sparsity`` (the schedule's
        now, weighted by target size), for the framework's logger."""
        pruner = self.built()
        version = pruner.masks.version
        if self._logged is None or self._logged[0] != version:
            # The realised sparsity moves only when the masks do: no pass over the weights
            # at every log.
            self._logged = (version, pruner.sparsity())
        out = {"sparsity": self._logged[1]}
        target = pruner.target_sparsity()
        if target:
            sizes = {t.name: t.param.numel() for t in pruner.targets}
            total = sum(sizes[n] for n in target)
            out["target_sparsity"] = sum(s * sizes[n] for n, s in target.items()) / total
        return out

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """Feed evaluation metrics to the controller, if there is one."""
        if self.controller is not None:
            self.controller.observe({k: float(v) for k, v in metrics.items()
                                     if isinstance(v, (int, float, torch.Tensor))})

    def state_dict(self) -> dict[str, Any]:
        """The pruner's state and the controller's."""
        state: dict[str, Any] = {"pruner": self.built().state_dict()}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (kept until the pruner is built, if it is not yet)."""
        if self.pruner is None:
            self._pending = state
            return
        self.pruner.load_state_dict(state["pruner"])
        if self.controller is not None and "controller" in state:
            self.controller.load_state_dict(state["controller"])
