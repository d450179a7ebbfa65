"""The channel-coupling graph: which slices of which parameters form one prunable unit.

A low layer (it imports only torch, Torch-Pruning and :mod:`secateurs.targets`), in the
spirit of Torch-Pruning's ``dependency/`` under its pruners:

- :mod:`.groups`: channel groups found by tracing the model (:func:`discover`);
- :mod:`.slicing`: one slicer per Torch-Pruning handler type, turning a handler call into
  parameter slices (:data:`SLICERS`, :func:`register_slicer`);
- :mod:`.planning`: the groups a pruner's targets produce, and their masks from keep
  vectors (:func:`plan_channels`).
"""

from __future__ import annotations

from .groups import ChannelGroup, Heads, Op, Slice, Structure, bare_copy, discover, forward
from .planning import ChannelPlan, KeptGroup, plan_channels
from .slicing import INEXACT, SLICERS, Cut, register_slicer

__all__ = ["INEXACT", "SLICERS", "ChannelGroup", "ChannelPlan", "Cut", "Heads", "KeptGroup",
           "Op", "Slice", "Structure", "bare_copy", "discover", "forward", "plan_channels",
           "register_slicer"]
