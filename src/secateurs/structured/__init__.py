"""Structured pruning: whole channels, neurons and heads, physically removed.

Channel groups (what must be removed together) are found by :mod:`secateurs.graph`, and
the group criteria ``l1``, ``l2``, ``bn_scale`` live with the other criteria
(:mod:`secateurs.criteria.group`); both are re-exported here. This package is the surgery:

- :mod:`.compaction`: :func:`compact_`, removing groups whose masks are off.
- :mod:`.counting`: :func:`count`, parameters, MACs and bytes.
- :mod:`.api`: :func:`prune_channels_`, from a trained model to a compacted one.
- :mod:`.models`: small reference networks, one per dependency pattern.
"""

from __future__ import annotations

from ..criteria.group import BNScale, GroupL1, GroupL2, bn_penalty
from ..graph import ChannelGroup, Structure, discover
from . import models
from .api import StructuredResult, prune_channels_
from .compaction import CompactionError, check_compactable, compact_
from .counting import Counts, Latency, count, latency

__all__ = [
    "BNScale",
    "ChannelGroup",
    "CompactionError",
    "Counts",
    "GroupL1",
    "GroupL2",
    "Latency",
    "Structure",
    "StructuredResult",
    "bn_penalty",
    "check_compactable",
    "compact_",
    "count",
    "discover",
    "latency",
    "models",
    "prune_channels_",
]
