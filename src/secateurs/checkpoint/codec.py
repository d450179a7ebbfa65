"""Nested state (dicts, lists, tuples, tensors, numbers) to a JSON tree and flat tensors, and back.

:func:`encode` turns a state tree into JSON whose tensors are references into the flat
dict an :class:`Encoder` collects (what safetensors stores); :func:`decode` rebuilds the
tree from the JSON and the tensors read back. Tagged nodes keep what JSON cannot say:
``$tensor`` and ``$ndarray`` (references), ``$bits`` (a bool tensor packed eight to a byte),
``$float`` (Inf and NaN), ``$tuple``, and ``$items`` (a dict with keys that are not strings).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .header import CheckpointError

__all__ = ["Encoder", "decode", "encode"]


class Encoder:
    """Collects the tensors of encoded state under keys the JSON tree refers to.

    Attributes:
        tensors: Key -> dense, contiguous CPU tensor (what safetensors writes).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: set[int] = set()

    def add(self, path: str, t: torch.Tensor) -> str:
        """Store ``t`` under a key derived from ``path``; a tensor seen before is stored once.

        Raises:
            TypeError: for a tensor that is not dense (sparse, nested).
        """
        if t.layout != torch.strided:
            raise TypeError(f"{path}: only dense (strided) tensors can be saved, got {t.layout}")
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        view = (ptr, t.device, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ptr and view in self._views:
            return self._views[view]  # tied weights: one copy on disk, two references
        out = t.cpu().contiguous()
        out_ptr = out.untyped_storage().data_ptr() if out.numel() else 0
        if out_ptr and out_ptr in self._storages:
            # safetensors refuses tensors that share memory: another view gets its own copy.
            out = out.clone()
            out_ptr = out.untyped_storage().data_ptr()
        key = path
        while key in self.tensors:
            key += "'"
        self.tensors[key] = out
        if ptr:
            self._views[view] = key
            self._storages.add(out_ptr)
        return key


@functools.singledispatch
def encode(value: object, path: str, enc: Encoder) -> Any:
    """The JSON node of ``value``; its tensors go to ``enc`` under keys derived from ``path``.

    Raises:
        TypeError: for a value that is not a tensor, number, string, ``None``, list, tuple,
            dict or numpy array or scalar (``path`` says where it sits).
    """
    raise TypeError(f"{path}: cannot save a value of type {type(value).__name__} ({value!r}); "
                    "state must be tensors, numbers, strings, None, lists, tuples and dicts")


@encode.register(type(None))
@encode.register(bool)
@encode.register(int)
@encode.register(str)
def _(value: object, path: str, enc: Encoder) -> Any:
    return value


@encode.register(float)
def _(value: float, path: str, enc: Encoder) -> Any:
    # JSON has no Inf or NaN; repr() round-trips every finite float exactly.
    return value if math.isfinite(value) else {"$float": repr(value)}


@encode.register(np.generic)
def _(value: np.generic, path: str, enc: Encoder) -> Any:
    return encode(value.item(), path, enc)


@encode.register(np.ndarray)
def _(value: np.ndarray, path: str, enc: Encoder) -> Any:
    return {"$ndarray": enc.add(path, torch.from_numpy(np.ascontiguousarray(value)))}


@encode.register(torch.Tensor)
def _(value: torch.Tensor, path: str, enc: Encoder) -> Any:
    if value.dtype == torch.bool:
        bits = np.packbits(value.detach().cpu().reshape(-1).numpy())
        return {"$bits": enc.add(path, torch.from_numpy(bits)), "shape": list(value.shape)}
    return {"$tensor": enc.add(path, value)}


@encode.register(list)
@encode.register(tuple)
def _(value: list[Any] | tuple[Any, ...], path: str, enc: Encoder) -> Any:
    items = [encode(v, f"{path}/{i}", enc) for i, v in enumerate(value)]
    return items if isinstance(value, list) else {"$tuple": items}


@encode.register(dict)
def _(value: dict[Any, Any], path: str, enc: Encoder) -> Any:
    if all(isinstance(k, str) and not k.startswith("$") for k in value):
        return {k: encode(v, f"{path}/{k}", enc) for k, v in value.items()}
    # Non-string keys (an optimizer's parameter indices) keep their type as pairs.
    return {"$items": [[encode(k, f"{path}/key", enc), encode(v, f"{path}/{k}", enc)]
                       for k, v in value.items()]}


MAX_DEPTH = 64  # nesting of a state tree; optimizer states need about 6


def _bits(node: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(n) for n in node["shape"]]
    packed = tensors[node["$bits"]]
    count = math.prod(shape)
    # The declared shape must fit the bytes present: a crafted shape must not allocate.
    if min(shape, default=0) < 0 or packed.dtype != torch.uint8 or packed.dim() != 1 \
            or -(-count // 8) != packed.numel():
        raise ValueError(f"a mask of shape {shape} needs {-(-count // 8)} packed bytes, the "
                         f"file holds {packed.numel()} ({packed.dtype})")
    if packed.device.type == "meta":
        return torch.empty(shape, dtype=torch.bool, device="meta")
    flat = np.unpackbits(packed.numpy(), count=count).astype(bool)
    return torch.from_numpy(flat).reshape(shape)


def _ndarray(node: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    t = tensors[node["$ndarray"]]
    return t if t.device.type == "meta" else t.numpy().copy()


_DECODERS: dict[str, Callable[[dict[str, Any], Mapping[str, torch.Tensor], int], Any]] = {
    "$tensor": lambda node, ts, depth: ts[node["$tensor"]],
    "$bits": lambda node, ts, depth: _bits(node, ts),
    "$ndarray": lambda node, ts, depth: _ndarray(node, ts),
    "$float": lambda node, ts, depth: float(node["$float"]),
    "$tuple": lambda node, ts, depth: tuple(_decode(v, ts, depth) for v in node["$tuple"]),
    "$items": lambda node, ts, depth: {_decode(k, ts, depth): _decode(v, ts, depth)
                                       for k, v in node["$items"]},
}


def decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The state :func:`encode` turned into ``node``, its tensors taken from ``tensors``.

    Tensors on the ``meta`` device (shapes and dtypes without data) give a tree of
    ``meta`` tensors: what checks against live objects need, at no memory cost.

    Raises:
        CheckpointError: for a tagged node that is malformed or refers to a missing tensor,
            a mask whose shape does not fit its packed bytes, or a tree nested more than
            ``MAX_DEPTH`` levels deep.
    """
    return _decode(node, tensors, 0)


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CheckpointError(f"malformed checkpoint: state nested more than {MAX_DEPTH} "
                              "levels deep")
    if isinstance(node, list):
        return [_decode(v, tensors, depth + 1) for v in node]
    if not isinstance(node, dict):
        return node
    tag = next((k for k in node if k.startswith("$")), None)
    if tag is None:
        return {k: _decode(v, tensors, depth + 1) for k, v in node.items()}
    try:
        return _DECODERS[tag](node, tensors, depth + 1)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError,
            OverflowError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"malformed checkpoint node {tag!r}: "
                              f"{type(err).__name__}: {err}") from None
