"""What :func:`~secateurs.prune_` did: :class:`PruneReport`, one :class:`TargetReport` per
target."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pruner import kept_table
from ..tables import text_table

__all__ = ["MODES", "PruneReport", "TargetReport"]

#: How the calibration passes ran: one pass for every target; the layer-wise pipeline
#: (each repeated block run alone on the outputs of the blocks already pruned); or
#: whole-model passes, one per stage.
MODES = ("one pass", "blocks", "stages")


@dataclass(frozen=True)
class TargetReport:
    """One target of a :class:`PruneReport`.

    Attributes:
        name: Target name.
        shape: Weight shape.
        sparsity: Realised fraction of pruned weights.
        relative_error: ``||(W - W') X||_F^2 / ||W X||_F^2`` on the layer's calibration
            inputs ``X`` (``None`` when ``X^T X`` was not collected, or when every input
            was zero, which leaves it undefined).
        stage: The stage it was pruned in (``""`` when not sequential; the block name in
            the layer-wise pipeline, ``"stem"`` / ``"head"`` for targets before / after
            the blocks).
        dead_features: Input features that were zero on every calibration input (``0``
            when no input statistics were collected). Their weights count towards the
            sparsity like any other: the mask decides, reconstruction keeps the ones it
            keeps, and nothing beyond the requested sparsity is pruned.
    """

    name: str
    shape: tuple[int, ...]
    sparsity: float
    relative_error: float | None
    stage: str
    dead_features: int = 0


@dataclass
class PruneReport:
    """What :func:`~secateurs.prune_` did: per-target results, masks and time.

    Attributes:
        targets: One :class:`TargetReport` per target, in model order.
        masks: Target name -> bool mask (``True`` = kept), e.g. to keep pruned weights at
            zero in later training with :class:`~secateurs.Pruner`.
        seconds: Wall time of the whole call.
        calibration_seconds: Time in calibration passes and scoring.
        reconstruction_seconds: Time in weight reconstruction.
        passes: Statistics passes over the batches: one per stage when sequential (in
            the layer-wise pipeline a pass runs one block only).
        kept: Target name -> why its output channels stay at full width (channel
            granularity: model outputs, normalised widths, couplings that cannot be
            resolved safely).
        mode: How the passes ran, one of :data:`MODES`.
        block_calls: Calls of single blocks by the layer-wise pipeline (two per block
            and batch: statistics, then the pruned block's outputs), ``0`` otherwise.
        notes: Sentences about what happened that the table does not show (why
            sequential pruning fell back to whole-model passes, dead input features).
    """

    targets: list[TargetReport] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    reconstruction_seconds: float = 0.0
    passes: int = 0
    kept: dict[str, str] = field(default_factory=dict)
    mode: str = "one pass"
    block_calls: int = 0
    notes: list[str] = field(default_factory=list)

    def sparsity(self) -> float:
        """Fraction of pruned weights over all targets."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def dead_note(self) -> str | None:
        """A sentence about the targets with dead input features, or ``None``."""
        dead = [r for r in self.targets if r.dead_features]
        if not dead:
            return None
        return (f"{len(dead)} target(s) saw input features that were zero on every "
                f"calibration input ({sum(r.dead_features for r in dead)} features in all, "
                f"e.g. {dead[0].name!r}: {dead[0].dead_features}); their weights were pruned "
                "only where the mask chose, so the realised sparsity is the requested one")

    def __str__(self) -> str:
        cells = [[r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}",
                  "-" if r.relative_error is None else f"{r.relative_error:.4f}"]
                 for r in self.targets]
        lines = [text_table(["target", "shape", "sparsity", "rel. error"], cells, left=2)]
        lines.append(f"total sparsity {self.sparsity():.1%}; {self.seconds:.2f} s "
                     f"(calibration {self.calibration_seconds:.2f} s in {self.passes} passes, "
                     f"reconstruction {self.reconstruction_seconds:.2f} s)")
        lines += [f"note: {n}" for n in self.notes]
        if self.kept:
            lines += ["", kept_table(self.kept)]
        return "\n".join(lines)
