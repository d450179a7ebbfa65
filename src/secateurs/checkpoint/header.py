"""The checkpoint format: its name and version, the error it raises, and its header.

A checkpoint is a safetensors file whose ``__metadata__`` holds two entries: the secateurs
header (JSON: format, versions, meta, and the state tree with references to the tensors)
and the SHA-256 of the content. The container itself is read and written by
:mod:`.container`.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "HASH_KEY", "HEADER_KEY", "CheckpointError",
           "CheckpointInfo", "versions"]

FORMAT = "secateurs.checkpoint"
FORMAT_VERSION = 1
HEADER_KEY = "secateurs"  # the safetensors metadata entry holding the JSON header
HASH_KEY = "sha256"       # the one holding the content hash


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is malformed or corrupted, or does not fit the
    objects it is loaded into; under ``torch.distributed``, also what the other ranks raise
    when the writing rank fails to write one (naming its error)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says.

    Attributes:
        path: The file.
        sha256: Hash of the content (header JSON and every tensor's name, dtype, shape, bytes).
        versions: Versions of the software that wrote it (``secateurs``, ``torch``, ...).
        sections: What it holds: ``model``, ``pruner``, ``optimizer``, ``states``, ``rng``.
        meta: The JSON-serialisable ``meta`` given to :func:`~secateurs.checkpoint.save`
            (e.g. epoch, metrics).
    """

    path: Path
    sha256: str
    versions: dict[str, str]
    sections: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)


@functools.cache
def versions() -> dict[str, str]:
    """Versions of the software writing a checkpoint (recorded in its header)."""
    def version(package: str) -> str:
        try:
            return importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            return "unknown"

    return {"secateurs": version("secateurs"), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
