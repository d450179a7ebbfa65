"""Exported safetensors files that say when they have changed: a content hash in the header.

The hash is the one :func:`secateurs.save` checkpoints carry
(:func:`~secateurs.checkpoint.digest.content_digest`): SHA-256 over the header text and
every tensor's name, dtype, shape and bytes. Here the header text is the file's whole
``__metadata__`` (every entry but the hash itself) as canonical JSON, so one changed byte
anywhere, in a tensor, in its dtype or shape, or in the metadata, shows on reading. Writes
go through :func:`~secateurs.checkpoint.write_atomic`, reads through
:func:`~secateurs.checkpoint.read_header` (which checks the file holds every byte its
header lists before anything is allocated); nothing is unpickled.

A file without a hash (written before files carried one, or by another program) still
reads, with an :class:`UnverifiedFileWarning`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..checkpoint import CheckpointError, read_header, write_atomic
from ..checkpoint.digest import content_digest
from ..checkpoint.header import HASH_KEY

__all__ = ["FORMAT_VERSION", "HASH_KEY", "META_KEY", "UnverifiedFileWarning", "deduplicate",
           "export_header", "file_digest", "read_verified", "restore_aliases", "write_hashed"]

#: The metadata entry holding an exported file's secateurs header (JSON).
META_KEY = "secateurs.export"
#: Version of that header; 2 and later carry a content hash (1 had none, and still loads).
FORMAT_VERSION = 2


class UnverifiedFileWarning(UserWarning):
    """A file was read that carries no content hash, so its integrity cannot be checked."""


def _header_text(metadata: Mapping[str, str]) -> str:
    return json.dumps({k: v for k, v in metadata.items() if k != HASH_KEY}, sort_keys=True)


def write_hashed(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str]) -> tuple[Path, str]:
    """Write ``tensors`` as safetensors, atomically, with ``metadata`` and its content hash.

    Args:
        path: Destination file.
        tensors: Name -> dense CPU tensor (no two sharing memory: see :func:`deduplicate`).
        metadata: Text entries for the header (``format: pt`` is what Hugging Face expects).

    Returns:
        The path written and the content hash stored under ``sha256``.
    """
    digest = content_digest(_header_text(metadata), tensors)
    meta = {**metadata, HASH_KEY: digest}
    out = write_atomic(path, lambda tmp: safetensors.torch.save_file(dict(tensors), tmp, meta))
    return out, digest


def read_verified(path: str | os.PathLike[str], *, required: bool = False
                  ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a safetensors file and check its content hash, if it has one.

    Args:
        path: The file.
        required: Refuse a file without a hash (rather than warn and read it).

    Returns:
        Its ``__metadata__`` entries and its tensors.

    Raises:
        CheckpointError: (a ``ValueError``, naming the file) for a truncated or unreadable
            file, a hash that differs from the content, a missing hash when ``required``,
            or a missing hash in a file whose secateurs header says it had one.

    Warns:
        UnverifiedFileWarning: for a file without a hash, when not ``required``.
    """
    path = Path(path)
    metadata = dict(read_header(path).get("__metadata__") or {})
    try:
        tensors = safetensors.torch.load_file(path)
    except Exception as err:  # the Rust reader raises its own error type
        raise CheckpointError(f"{str(path)!r} cannot be read as safetensors: {err}") from None
    recorded = metadata.get(HASH_KEY)
    if recorded is None:
        export_header(metadata, f"file {str(path)!r}")  # refuses a file that lost its hash
        if required:
            raise CheckpointError(f"{str(path)!r} carries no content hash ({HASH_KEY!r} in "
                                  "its metadata), so its integrity cannot be verified")
        warnings.warn(f"{str(path)!r} carries no content hash; its integrity cannot be "
                      "verified", UnverifiedFileWarning, stacklevel=3)
        return metadata, tensors
    digest = content_digest(_header_text(metadata), tensors)
    if digest != recorded:
        raise CheckpointError(f"{str(path)!r} is corrupted: content hash {digest[:16]}... "
                              f"differs from the recorded {recorded[:16]}...")
    return metadata, tensors


def export_header(metadata: Mapping[str, str], where: str) -> dict[str, Any]:
    """The secateurs header of an exported file (``{}`` for a foreign one), its ``aliases``
    (name -> the name whose tensor it shares) checked.

    Raises:
        CheckpointError: for a malformed header, or one of a version that carries a hash
            in a file that has none (the hash was removed, so nothing can be verified).
    """
    try:
        info = json.loads(metadata.get(META_KEY, "{}"))
        aliases = {str(k): str(v) for k, v in info.get("aliases", {}).items()}
        version = int(info.get("format_version", 1))
    except (ValueError, TypeError, AttributeError):
        raise CheckpointError(f"{where} has a malformed {META_KEY!r} header") from None
    if HASH_KEY not in metadata and version > 1:
        raise CheckpointError(f"{where} has lost its content hash: it was written with one "
                              f"({HASH_KEY!r} in its metadata) and cannot be verified")
    return {**info, "aliases": aliases}


def restore_aliases(state: dict[str, torch.Tensor], aliases: Mapping[str, str],
                    where: str) -> None:
    """Put tied tensors back under every name (the inverse of :func:`deduplicate`).

    Raises:
        CheckpointError: for an alias of a tensor the file does not hold.
    """
    for alias, kept in aliases.items():
        if kept not in state:
            raise CheckpointError(f"{where} names {alias!r} a copy of {kept!r}, which it "
                                  "does not hold")
        state[alias] = state[kept]


def file_digest(path: Path) -> str:
    """The content hash of any file's bytes (config and tokenizer files beside the weights)."""
    data = path.read_bytes()
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.empty(0, dtype=torch.uint8)
    return content_digest(path.name, {"bytes": raw})


def deduplicate(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, str]]:
    """Tied tensors stored once: ``(name -> tensor, alias -> name kept)``.

    The first name of each shared view is kept (in a Hugging Face model, the input
    embedding rather than the output layer tied to it, as ``save_pretrained`` does); the
    kept tensors are detached, contiguous CPU copies.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in state.items():
        view = (value.untyped_storage().data_ptr(), value.device, value.storage_offset(),
                value.shape, value.stride(), value.dtype)
        if value.numel() and view in seen:
            aliases[key] = seen[view]
            continue
        seen[view] = key
        tensors[key] = value.detach().cpu().contiguous()
    return tensors, aliases
