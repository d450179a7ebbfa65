"""The learning rate coupled to pruning: LR rewinding or a warm restart after each prune event.

A prune event (a mask update that removes weights) perturbs the model; training recovers
faster when the learning rate goes back up. :class:`PruneLR` is the step callback that
steps the pruner and, after each event, either

- rewinds the learning rate schedule to ``to_step`` (LR rewinding, Renda, Frankle & Carbin
  2020, "Comparing Rewinding and Fine-tuning in Neural Network Pruning"), keeping what a
  :class:`~secateurs.controllers.Plateau` has reduced; or
- restarts it warm (Loshchilov & Hutter 2017, "SGDR"): back to step 0, the plateau
  reductions dropped and the plateau's memory of the best metric cleared.

Example:
    >>> lr = ScheduledLR(opt, Cosine(1.0, 0.0, end_step=total))
    >>> plateau = Plateau(lr, patience=2)
    >>> step = PruneLR(pruner, lr, mode="rewind", to_step=0, plateau=plateau)
    >>> train(model, opt, data, epochs=10, callbacks=[step, lambda s: lr.step()],
    ...       epoch_callbacks=[lambda e, m: plateau.observe(m["val_accuracy"])])
"""

from __future__ import annotations

from typing import Any, Literal

from torch.optim.lr_scheduler import LRScheduler

from ..lr import ScheduledLR, rewind_
from ..pruner import Pruner
from ..validation import choice, instance, integer, optional
from .plateau import Plateau

__all__ = ["PruneLR"]

_MODES = ("rewind", "restart")


class PruneLR:
    """Step callback: ``pruner.step()``, then rewind or restart the learning rate on events.

    Call it right after ``optimizer.step()`` in place of ``pruner.step()``, before the
    scheduler's own ``step()``.

    Args:
        pruner: The pruner to step.
        scheduler: A :class:`~secateurs.lr.ScheduledLR` or a torch scheduler that
            :func:`~secateurs.lr.rewind_` supports.
        mode: ``"rewind"`` (to ``to_step``, scale kept) or ``"restart"`` (to step 0, scale
            reset to 1 and ``plateau`` cleared).
        to_step: The step rewound to, in mode ``"rewind"``.
        plateau: A plateau controller whose memory a warm restart clears.

    Raises:
        ArgumentTypeError: (a ``TypeError`` and a ``ValueError``) for a ``mode`` that is not
            a string, a ``to_step`` that is not an integer or a ``plateau`` that is not a
            :class:`~secateurs.controllers.Plateau`.
        ValueError: for an unknown mode or a negative ``to_step``.
    """

    def __init__(self, pruner: Pruner, scheduler: ScheduledLR | LRScheduler, *,
                 mode: Literal["rewind", "restart"] = "rewind", to_step: int = 0,
                 plateau: Plateau | None = None) -> None:
        self.mode = choice("mode", mode, _MODES)
        self.to_step = integer("to_step", to_step, low=0)
        self.plateau = optional(instance, "plateau", plateau, types=Plateau,
                                what="a secateurs.controllers.Plateau or None")
        self.pruner = pruner
        self.scheduler = scheduler
        self.events = 0

    def __call__(self, step: int) -> dict[str, float]:
        """Step the pruner; on a prune event, act on the learning rate."""
        before = self.pruner.sparsity()
        updated = self.pruner.step()
        event = updated and self.pruner.sparsity() > before
        if event:
            self.events += 1
            self._react()
        return {"prune_event": float(event)}

    def _react(self) -> None:
        if self.mode == "rewind":
            rewind_(self.scheduler, self.to_step)
            return
        rewind_(self.scheduler, 0)
        if isinstance(self.scheduler, ScheduledLR):
            self.scheduler.scale = 1.0
        if self.plateau is not None:
            self.plateau.reset()

    def state_dict(self) -> dict[str, Any]:
        """The number of prune events seen."""
        return {"events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.events = int(state["events"])
