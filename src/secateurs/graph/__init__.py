"""The channel-coupling graph: which slices of which parameters form one prunable unit.

A low layer (it imports only torch, Torch-Pruning and :mod:`secateurs.targets`), in the
spirit of Torch-Pruning's ``dependency/`` under its pruners:

- :mod:`.structure`: the records: parameter slices, handler calls, resizes, channel groups;
- :mod:`.groups`: channel groups found by tracing the model (:func:`discover`), with a
  bounded search (:mod:`.search`) for the layers coupled to each root;
- :mod:`.blocks`: known transformer blocks (q/k/v/o and fused GPT-2 attention, gated and
  plain MLPs) recognised by their layers, their groups built directly
  (:func:`register_block` for more);
- :mod:`.layers`: Torch-Pruning handlers for layers it does not know (GPT-2's ``Conv1D``,
  RMS norms, recognised blocks traced as one step);
- :mod:`.slicing`: one slicer per Torch-Pruning handler type, turning a handler call into
  parameter slices (:data:`SLICERS`, :func:`register_slicer`);
- :mod:`.planning`: the groups a pruner's targets produce, and their masks from keep
  vectors (:func:`plan_channels`).
"""

from __future__ import annotations

from .blocks import find_blocks, register_block
from .groups import bare_copy, discover, forward, tensors
from .planning import ChannelPlan, KeptGroup, plan_channels
from .slicing import INEXACT, SLICERS, Cut, register_slicer
from .structure import ChannelGroup, Heads, Op, Resize, Slice, Structure

__all__ = ["INEXACT", "SLICERS", "ChannelGroup", "ChannelPlan", "Cut", "Heads", "KeptGroup",
           "Op", "Resize", "Slice", "Structure", "bare_copy", "discover", "find_blocks",
           "forward", "plan_channels", "register_block", "register_slicer", "tensors"]
