"""The content hash of a checkpoint: SHA-256 over its header and every tensor."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["content_digest"]

_CHUNK = 1 << 23  # bytes hashed per task


def content_digest(header: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header JSON and each tensor's name, dtype, shape and the SHA-256 of
    each 8 MiB chunk of its bytes (chunks are hashed in threads: hashlib releases the GIL).

    Args:
        header: The header JSON text.
        tensors: Name -> CPU tensor, as stored.

    Returns:
        The hex digest.
    """
    chunks = []
    for key in sorted(tensors):
        t = tensors[key]
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
        chunks.append((key, t, [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)]))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        sums = [list(pool.map(lambda b: hashlib.sha256(b).digest(), parts))
                for _, _, parts in chunks]
    h = hashlib.sha256(header.encode())
    for (key, t, _), parts in zip(chunks, sums, strict=True):
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(b"".join(parts))
    return h.hexdigest()
