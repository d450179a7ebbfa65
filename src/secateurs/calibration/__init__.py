"""Calibration: passes over sample inputs that collect streaming statistics of each target
layer's input features (per-feature sums of ``|x|`` and ``x^2``, counts, ``X^T X``), and
gradient sums for first-order criteria. A criterion declares what it needs as a
:class:`Request`; :func:`observe` runs the passes. :mod:`.pipeline` runs them block by
block for sequential pruning (:class:`BlockPipeline`: cost linear in depth)."""

from __future__ import annotations

from .collect import (
    Batch,
    Call,
    LossFn,
    calibrate,
    call_order,
    check_batches,
    eval_mode,
    gradient_sums,
    input_tensor,
    model_device,
    run_batch,
    to_device,
)
from .features import FeatureMap, feature_map, register_feature_map
from .observe import Observed, Request, observe
from .pipeline import BlockPipeline, BlockPlan, Blocks, plan_blocks, repeated_blocks
from .stats import DEFAULT_POWERS, InputStats, check_power

__all__ = [
    "DEFAULT_POWERS",
    "Batch",
    "BlockPipeline",
    "BlockPlan",
    "Blocks",
    "Call",
    "FeatureMap",
    "InputStats",
    "LossFn",
    "Observed",
    "Request",
    "calibrate",
    "call_order",
    "check_batches",
    "check_power",
    "eval_mode",
    "feature_map",
    "gradient_sums",
    "input_tensor",
    "model_device",
    "observe",
    "plan_blocks",
    "register_feature_map",
    "repeated_blocks",
    "run_batch",
    "to_device",
]
