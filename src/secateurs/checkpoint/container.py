"""The safetensors container, written and read through one open file.

The layout is the standard one (8 bytes of header length, a JSON header listing each
tensor's dtype, shape and byte range, then the bytes), so any safetensors reader opens
these files. Reading goes through one file descriptor from the first byte to the last,
so a file replaced on disk while it is read is never mixed with its successor, and every
size the header declares is checked against the bytes present before anything is
allocated: a crafted header cannot make the reader allocate more than the file holds.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .header import CheckpointError

__all__ = ["Layout", "open_regular", "read_header", "read_layout", "read_tensors",
           "write_tensors"]

MAX_HEADER = 100 * 2**20  # bytes of JSON header accepted (the safetensors reader's limit)

_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
          "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
          "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
          "U64": "uint64", "U32": "uint32", "U16": "uint16"}
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _NAMES.items()
                                  if isinstance(getattr(torch, v, None), torch.dtype)}
_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of the container: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Layout:
    """What a container's header says, checked against the file's size.

    Attributes:
        metadata: The ``__metadata__`` text entries.
        entries: Tensor name -> :class:`Entry`.
        data_start: Offset of the first tensor byte in the file.
        size: The file's size in bytes.
    """

    metadata: dict[str, str]
    entries: dict[str, Entry]
    data_start: int
    size: int

    def shapes(self) -> dict[str, torch.Tensor]:
        """Name -> a tensor on the ``meta`` device with the declared shape and dtype (no
        memory): what checks against live objects look at before any byte is read."""
        return {k: torch.empty(e.shape, dtype=e.dtype, device="meta")
                for k, e in self.entries.items()}


def write_tensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (dense, contiguous, CPU) and ``metadata`` as safetensors to ``f``.

    Tensors go in order of decreasing element size, then name, so each starts aligned to
    its element size (as the safetensors library lays them out).

    Raises:
        TypeError: for a dtype safetensors cannot store.
        OSError: when writing fails (disk full, I/O error).
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _CODES:
            raise TypeError(f"{key}: safetensors cannot store dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for key in order:
        t = tensors[key]
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def open_regular(path: Path) -> io.BufferedReader:
    """``path`` opened for reading, refusing at once anything but a regular file.

    Opening does not block (a FIFO without a writer would block a plain ``open`` forever),
    and the type is checked on the open descriptor, so the file checked is the file read.

    Raises:
        CheckpointError: if it cannot be opened, or is a FIFO, device, socket or directory.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise CheckpointError(f"cannot read {str(path)!r}: it is {kind}, not a file")
        f = os.fdopen(fd, "rb")
        assert isinstance(f, io.BufferedReader)
        return f
    except BaseException:
        os.close(fd)
        raise


def parse_json(raw: bytes | str, where: str, what: str) -> Any:
    """``raw`` read as JSON; :class:`CheckpointError` naming ``where`` and ``what`` (e.g.
    ``"safetensors header"``) when it is malformed or nested too deeply to read."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{where} has a {what} nested too deeply") from None
    except ValueError:
        raise CheckpointError(f"{where} has a malformed {what}") from None


def _parse(raw: bytes, where: str) -> dict[str, Any]:
    header = parse_json(raw, where, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} has a malformed safetensors header (not an object)")
    return header


def _entry(key: str, node: Any, where: str) -> Entry:
    try:
        dtype = DTYPES[node["dtype"]]
        shape = tuple(node["shape"])
        begin, end = node["data_offsets"]
        if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)):
            raise ValueError("shape and offsets must be integers >= 0")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: malformed entry for tensor {key!r}: "
                              f"{type(err).__name__}: {err}") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: tensor {key!r} declares shape {list(shape)} "
                              f"({nbytes} bytes of {dtype}) but a byte range of "
                              f"{end - begin}")
    return Entry(dtype, shape, begin, end)


def read_layout(f: io.BufferedReader, path: Path) -> Layout:
    """Parse and check the header of the container open as ``f``.

    Every tensor's byte range must match its shape and dtype, the ranges must tile the
    data section without gaps or overlaps, and the data section must end where the file
    ends.

    Raises:
        CheckpointError: for a truncated file, trailing bytes, or a malformed header.
    """
    where = repr(str(path))
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= size - 8:
        raise CheckpointError(f"{where} is truncated or not a safetensors file ({size} bytes)")
    if n > MAX_HEADER:
        raise CheckpointError(f"{where} declares a header of {n} bytes; at most {MAX_HEADER} "
                              "are read")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{where} is truncated or not a safetensors file ({size} bytes)")
    header = _parse(raw, where)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where} has malformed safetensors metadata")
    entries = {str(k): _entry(str(k), v, where) for k, v in header.items()}
    end = 0
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != end:
            raise CheckpointError(f"{where}: tensor {key!r} starts at byte {e.begin} of the "
                                  f"data, not at {end} (gap or overlap)")
        end = e.end
    if 8 + n + end != size:
        raise CheckpointError(f"{where} is truncated or has trailing bytes: its header "
                              f"describes {8 + n + end} bytes, the file has {size}")
    return Layout(metadata, entries, 8 + n, size)


def read_tensors(f: io.BufferedReader, layout: Layout, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``layout``, read from ``f`` (the file its layout was read from).

    Raises:
        CheckpointError: if the file ends early (it was truncated while being read).
    """
    out: dict[str, torch.Tensor] = {}
    for key, e in sorted(layout.entries.items(), key=lambda kv: kv[1].begin):
        t = torch.empty(e.shape, dtype=e.dtype)
        if t.numel():
            view = t.reshape(-1).view(torch.uint8).numpy().data
            f.seek(layout.data_start + e.begin)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{str(path)!r} was truncated while being read")
                done += got
        out[key] = t
    return out


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The safetensors JSON header of ``path`` (``__metadata__`` included), after checking
    that the file holds every byte the header lists (a truncated file raises
    :class:`CheckpointError`)."""
    path = Path(path)
    with open_regular(path) as f:
        layout = read_layout(f, path)
    out: dict[str, Any] = {"__metadata__": dict(layout.metadata)}
    for key, e in layout.entries.items():
        out[key] = {"dtype": _CODES[e.dtype], "shape": list(e.shape),
                    "data_offsets": [e.begin, e.end]}
    return out
