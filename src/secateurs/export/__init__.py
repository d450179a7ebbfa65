"""Export: what leaves the training loop.

- :mod:`.weights`: a pruned model as plain safetensors with masks folded in, and a loader
  that rebuilds the masks from the zeros so a :class:`~secateurs.Pruner` can continue.
- :mod:`.hf`: a compacted Hugging Face model as a folder that loads again (plain
  ``from_pretrained`` where the config can say the new widths, :func:`load_compacted`
  where it cannot); no pickle, no code from the folder (imported on first use).
- :mod:`.integrity`: the content hash every exported safetensors file carries, checked
  on reading.
- :mod:`.onnx`: a (compacted) model to ONNX, with an onnxruntime parity check (extra
  ``export``; imported on first use).
- :mod:`.sparse`: CSR execution of sparse ``nn.Linear`` layers on CPU, swapped in only
  where measured faster.
"""

from __future__ import annotations

from typing import Any

from .integrity import UnverifiedFileWarning
from .sparse import LayerTiming, SparseLinear, SparseReport, sparsify_
from .weights import adopt_masks_, load_pruned, masks_from_zeros, pruner_from_zeros, save_pruned

__all__ = [
    "CompactedFolder",
    "LayerTiming",
    "OnnxExport",
    "ParityError",
    "SparseLinear",
    "SparseReport",
    "UnverifiedFileWarning",
    "adopt_masks_",
    "check_onnx",
    "export_onnx",
    "load_compacted",
    "load_pruned",
    "masks_from_zeros",
    "pruner_from_zeros",
    "save_compacted",
    "save_pruned",
    "sparsify_",
]

_ONNX = {"OnnxExport", "ParityError", "check_onnx", "export_onnx"}
_HF = {"CompactedFolder", "load_compacted", "save_compacted"}


def __getattr__(name: str) -> Any:
    # The ONNX exporter pulls in torch.onnx and onnxscript (seconds), the Hugging Face
    # folders transformers: load them when asked.
    if name in _ONNX:
        from . import onnx

        return getattr(onnx, name)
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
