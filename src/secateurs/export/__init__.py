"""Export: what leaves the training loop.

- :mod:`.weights`: a pruned model as plain safetensors with masks folded in, and a loader
  that rebuilds the masks from the zeros so a :class:`~secateurs.Pruner` can continue.
- :mod:`.onnx`: a (compacted) model to ONNX, with an onnxruntime parity check (extra
  ``export``; imported on first use).
- :mod:`.sparse`: CSR execution of sparse ``nn.Linear`` layers on CPU, swapped in only
  where measured faster.
"""

from __future__ import annotations

from typing import Any

from .sparse import LayerTiming, SparseLinear, SparseReport, sparsify_
from .weights import adopt_masks_, load_pruned, masks_from_zeros, pruner_from_zeros, save_pruned

__all__ = [
    "LayerTiming",
    "OnnxExport",
    "ParityError",
    "SparseLinear",
    "SparseReport",
    "adopt_masks_",
    "check_onnx",
    "export_onnx",
    "load_pruned",
    "masks_from_zeros",
    "pruner_from_zeros",
    "save_pruned",
    "sparsify_",
]

_ONNX = {"OnnxExport", "ParityError", "check_onnx", "export_onnx"}


def __getattr__(name: str) -> Any:
    # The ONNX exporter pulls in torch.onnx and onnxscript (seconds): load it when asked.
    if name in _ONNX:
        from . import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
