"""Checkpoints that resume a pruning run exactly and never execute code when read.

One file per checkpoint, in the safetensors format: its tensors are the model's state,
the optimizer's state, the pruner's masks (``torch.bool``, bit-packed eight to a byte),
criterion statistics and RNG states; its header holds, as JSON, everything else (steps,
hyper-parameters, controller and schedule state) with references to the tensors, the
versions that wrote it and a SHA-256 of the content. Reading parses JSON and raw tensor
bytes only: nothing is unpickled, so a file from elsewhere cannot run code.

Writes are atomic (temporary file, flush, ``fsync``, ``os.replace``): a process killed
mid-write leaves the previous checkpoint intact. Loading checks the file size, the content
hash, and names, shapes and dtypes against the live objects before changing anything.

Example:
    >>> sc.save("run.safetensors", model, pruner, optimizer, states={"lr": scheduler})
    >>> sc.load("run.safetensors", model, pruner, optimizer, states={"lr": scheduler})
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import random
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from .pruner import Pruner

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "check_state_dict",
    "load",
    "read_header",
    "read_info",
    "rng_state",
    "save",
    "set_rng_state",
    "write_atomic",
]

FORMAT = "secateurs.checkpoint"
FORMAT_VERSION = 1
_HEADER_KEY = "secateurs"
_HASH_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the objects it is loaded into."""


Stateful = Any  # anything with state_dict() and load_state_dict(state)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says.

    Attributes:
        path: The file.
        sha256: Hash of the content (header JSON and every tensor's name, dtype, shape, bytes).
        versions: Versions of the software that wrote it (``secateurs``, ``torch``, ...).
        sections: What it holds: ``model``, ``pruner``, ``optimizer``, ``states``, ``rng``.
        meta: The JSON-serialisable ``meta`` given to :func:`save` (e.g. epoch, metrics).
    """

    path: Path
    sha256: str
    versions: dict[str, str]
    sections: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)


# -- encoding: nested state (dicts, lists, tensors, numbers) <-> JSON tree + flat tensors -----

class _Encoder:
    """Turns nested state into a JSON tree whose tensors are references into a flat dict."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: set[int] = set()

    def add(self, path: str, t: torch.Tensor) -> str:
        """Store ``t`` under a key derived from ``path``; a tensor seen before is stored once."""
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
def _encode(value: object, path: str, enc: _Encoder) -> Any:
    raise TypeError(f"{path}: cannot save a value of type {type(value).__name__} ({value!r}); "
                    "state must be tensors, numbers, strings, None, lists, tuples and dicts")


@_encode.register(type(None))
@_encode.register(bool)
@_encode.register(int)
@_encode.register(str)
def _(value: object, path: str, enc: _Encoder) -> Any:
    return value


@_encode.register(float)
def _(value: float, path: str, enc: _Encoder) -> Any:
    # JSON has no Inf or NaN; repr() round-trips every finite float exactly.
    return value if math.isfinite(value) else {"$float": repr(value)}


@_encode.register(np.generic)
def _(value: np.generic, path: str, enc: _Encoder) -> Any:
    return _encode(value.item(), path, enc)


@_encode.register(np.ndarray)
def _(value: np.ndarray, path: str, enc: _Encoder) -> Any:
    return {"$ndarray": enc.add(path, torch.from_numpy(np.ascontiguousarray(value)))}


@_encode.register(torch.Tensor)
def _(value: torch.Tensor, path: str, enc: _Encoder) -> Any:
    if value.dtype == torch.bool:
        bits = np.packbits(value.detach().cpu().reshape(-1).numpy())
        return {"$bits": enc.add(path, torch.from_numpy(bits)), "shape": list(value.shape)}
    return {"$tensor": enc.add(path, value)}


@_encode.register(list)
@_encode.register(tuple)
def _(value: list[Any] | tuple[Any, ...], path: str, enc: _Encoder) -> Any:
    items = [_encode(v, f"{path}/{i}", enc) for i, v in enumerate(value)]
    return items if isinstance(value, list) else {"$tuple": items}


@_encode.register(dict)
def _(value: dict[Any, Any], path: str, enc: _Encoder) -> Any:
    if all(isinstance(k, str) and not k.startswith("$") for k in value):
        return {k: _encode(v, f"{path}/{k}", enc) for k, v in value.items()}
    # Non-string keys (an optimizer's parameter indices) keep their type as pairs.
    return {"$items": [[_encode(k, f"{path}/key", enc), _encode(v, f"{path}/{k}", enc)]
                       for k, v in value.items()]}


def _bits(node: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(n) for n in node["shape"]]
    count = math.prod(shape)
    flat = np.unpackbits(tensors[node["$bits"]].numpy(), count=count).astype(bool)
    return torch.from_numpy(flat).reshape(shape)


_DECODERS: dict[str, Callable[[dict[str, Any], Mapping[str, torch.Tensor]], Any]] = {
    "$tensor": lambda node, ts: ts[node["$tensor"]],
    "$bits": _bits,
    "$ndarray": lambda node, ts: ts[node["$ndarray"]].numpy().copy(),
    "$float": lambda node, ts: float(node["$float"]),
    "$tuple": lambda node, ts: tuple(_decode(v, ts) for v in node["$tuple"]),
    "$items": lambda node, ts: {_decode(k, ts): _decode(v, ts) for k, v in node["$items"]},
}


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    tag = next((k for k in node if k.startswith("$")), None)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    try:
        return _DECODERS[tag](node, tensors)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"malformed checkpoint node {tag!r}: {err}") from None


_CHUNK = 1 << 23  # bytes hashed per task


def _digest(header: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header JSON and each tensor's name, dtype, shape and the SHA-256 of
    each 8 MiB chunk of its bytes (chunks are hashed in threads: hashlib releases the GIL)."""
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


@functools.cache
def _versions() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            return "unknown"

    return {"secateurs": version("secateurs"), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# -- atomic writes ------------------------------------------------------------------------------

def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.

    A crash at any point leaves either the previous file or the complete new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


# -- RNG state ------------------------------------------------------------------------------

def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generator states (torch, CUDA if initialised, numpy, Python)."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    out["numpy"] = torch.tensor([*np.asarray(keys).tolist(), pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    out["python.gauss"] = torch.tensor([gauss_next is not None, gauss_next or 0.0],
                                       dtype=torch.float64)
    return out


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    missing = {"torch", "numpy", "numpy.gauss", "python", "python.gauss"} - set(state)
    if missing:
        raise CheckpointError(f"RNG state lacks {sorted(missing)}")
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = sorted(k for k in state if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k] for k in cuda][: torch.cuda.device_count()])
    np_state = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(np_state[:-2], dtype=np.uint32), np_state[-2],
                         np_state[-1], float(state["numpy.gauss"][0])))
    py = state["python"].tolist()
    has, value = state["python.gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), value if has else None))


def _check_types(model: object, pruner: object, optimizer: object) -> None:
    for name, value, kind, shown in [
            ("model", model, nn.Module, "a torch.nn.Module"),
            ("pruner", pruner, Pruner, "a secateurs.Pruner or None"),
            ("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer or None")]:
        if not isinstance(value, kind) and not (value is None and name != "model"):
            raise TypeError(f"{name} must be {shown}, got {type(value).__name__}")


# -- saving ---------------------------------------------------------------------------------

def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    pruner: Pruner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    states: Mapping[str, Stateful] | None = None,
    meta: Mapping[str, Any] | None = None,
    rng: bool | Mapping[int, Mapping[str, torch.Tensor]] = True,
) -> CheckpointInfo:
    """Write a checkpoint atomically: weights, masks, optimizer, schedules, controllers, RNG.

    Args:
        path: Destination file (conventionally ``*.safetensors``); replaced atomically.
        model: Its ``state_dict()`` (parameters and buffers).
        pruner: Its step, masks (bit-packed), last applied targets and criterion state
            (calibration statistics of data-driven criteria included).
        optimizer: Its ``state_dict()`` (momentum, Adam moments, learning rates).
        states: Name -> any object with ``state_dict()``/``load_state_dict()``: LR
            schedulers (``ScheduledLR``, ``torch.optim.lr_scheduler``), controllers
            (``Plateau``), a data sampler. Their state must be tensors, numbers, strings,
            ``None``, lists, tuples and dicts.
        meta: JSON-serialisable values to keep beside (epoch, metrics); read back by
            :func:`read_info`.
        rng: ``True`` saves this process's RNG states, ``False`` none; a mapping rank ->
            :func:`rng_state` saves one per rank (see :mod:`secateurs.distributed`).

    Returns:
        The header of what was written.

    Raises:
        TypeError: if some state holds a value that cannot be saved (nothing is written).
    """
    _check_types(model, pruner, optimizer)
    enc = _Encoder()
    sections: dict[str, Any] = {"model": _encode(model.state_dict(), "model", enc)}
    if pruner is not None:
        sections["pruner"] = _encode(pruner.state_dict(), "pruner", enc)
    if optimizer is not None:
        shapes = [list(p.shape) for g in optimizer.param_groups for p in g["params"]]
        sections["optimizer"] = {"param_shapes": shapes,
                                 "state": _encode(optimizer.state_dict(), "optimizer", enc)}
    if states:
        sections["states"] = {name: _encode(obj.state_dict(), f"states/{name}", enc)
                              for name, obj in states.items()}
    if rng is not False:
        ranks = {0: rng_state()} if rng is True else rng
        sections["rng"] = {str(r): _encode(dict(s), f"rng/{r}", enc) for r, s in ranks.items()}
    try:
        user_meta = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"meta must be JSON-serialisable, got {meta!r}: {err}") from None
    header = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                         "versions": dict(_versions()), "meta": user_meta, "sections": sections},
                        allow_nan=False)
    digest = _digest(header, enc.tensors)
    metadata = {"format": "pt", _HEADER_KEY: header, _HASH_KEY: digest}
    out = write_atomic(path, lambda tmp: safetensors.torch.save_file(enc.tensors, tmp, metadata))
    return CheckpointInfo(out, digest, dict(_versions()), tuple(sections), user_meta)


# -- reading --------------------------------------------------------------------------------

def read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of ``path``, after checking that the file holds every
    byte the header lists (a truncated file raises :class:`CheckpointError`)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= size - 8 else b""
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err}") from None
    if len(head) < 8 or not 0 < n <= size - 8 or len(raw) != n:
        raise CheckpointError(f"{str(path)!r} is truncated or not a safetensors file "
                              f"({size} bytes)")
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        raise CheckpointError(f"{str(path)!r} has a malformed safetensors header") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{str(path)!r} is truncated or has trailing bytes: "
                              f"its header describes {8 + n + end} bytes, the file has {size}")
    return header


def _read(path: str | os.PathLike[str],
          verify: bool = True) -> tuple[CheckpointInfo, dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    raw = read_header(path).get("__metadata__") or {}
    if _HEADER_KEY not in raw or _HASH_KEY not in raw:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a secateurs "
                              "checkpoint (no secateurs header)")
    header_text = raw[_HEADER_KEY]
    try:
        header = json.loads(header_text)
    except ValueError:
        raise CheckpointError(f"checkpoint {str(path)!r} has a malformed JSON header") from None
    if header.get("format") != FORMAT or not isinstance(header.get("format_version"), int):
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} file")
    if header["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{header['format_version']}, written by a newer secateurs "
                              f"({header['versions']}); this one reads up to {FORMAT_VERSION}")
    tensors: dict[str, torch.Tensor] = {}
    if verify:
        try:
            tensors = safetensors.torch.load_file(path)
        except Exception as err:  # the Rust reader raises its own error type
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {err}") from None
        digest = _digest(header_text, tensors)
        if digest != raw[_HASH_KEY]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: content hash "
                                  f"{digest[:16]}... differs from the recorded "
                                  f"{raw[_HASH_KEY][:16]}...")
    info = CheckpointInfo(path, raw[_HASH_KEY], dict(header["versions"]),
                          tuple(header["sections"]), dict(header.get("meta") or {}))
    return info, header["sections"], tensors


def read_info(path: str | os.PathLike[str], *, verify: bool = True) -> CheckpointInfo:
    """Read a checkpoint's header (versions, hash, meta) without a model.

    Args:
        path: The file.
        verify: Also read every tensor and check the content hash.

    Raises:
        CheckpointError: for a truncated, corrupted or foreign file.
    """
    return _read(path, verify)[0]


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's names, shapes
    and dtypes (``what`` names the source in the message)."""
    live = model.state_dict()
    missing = [k for k in live if k not in state]
    extra = [k for k in state if k not in live]
    if missing or extra:
        raise CheckpointError(f"{what} does not fit the model: missing {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                              f"{'...' if len(extra) > 8 else ''}")
    bad = [f"{k}: {tuple(v.shape)} {v.dtype} in {what}, {tuple(live[k].shape)} "
           f"{live[k].dtype} in the model" for k, v in state.items()
           if isinstance(v, torch.Tensor)
           and (v.shape != live[k].shape or v.dtype != live[k].dtype)]
    if bad:
        raise CheckpointError(f"{what} does not fit the model: {'; '.join(bad[:8])}")


def _check_pruner(pruner: Pruner, masks: dict[str, torch.Tensor], where: str) -> None:
    missing = [n for n in pruner.masks if n not in masks]
    extra = [n for n in masks if n not in pruner.masks]
    bad = [f"{n}: {tuple(m.shape)} saved, {tuple(pruner.masks[n].shape)} live"
           for n, m in masks.items() if n in pruner.masks and m.shape != pruner.masks[n].shape]
    if missing or extra or bad:
        raise CheckpointError(f"{where}: pruner targets differ: missing {missing[:8]}, "
                              f"unexpected {extra[:8]}, other shapes {bad[:8]}")


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Any, where: str) -> None:
    live = [list(p.shape) for g in optimizer.param_groups for p in g["params"]]
    if saved != live:
        first = next(i for i in range(max(len(saved), len(live)) + 1)
                     if i >= min(len(saved), len(live)) or saved[i] != live[i])
        raise CheckpointError(
            f"{where}: the optimizer's parameters differ: {len(saved)} saved, {len(live)} live; "
            f"first difference at index {first}")


def _current_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    pruner: Pruner | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    states: Mapping[str, Stateful] | None = None,
    rng: bool = True,
    rank: int | None = None,
) -> CheckpointInfo:
    """Restore a checkpoint written by :func:`save` into live objects, all or nothing.

    Everything that can be checked is checked before anything changes; if restoring a
    later part fails all the same, what was already restored is put back.

    Args:
        path: The file.
        model: Receives the weights and buffers (names, shapes and dtypes must match).
        pruner: Receives step, masks and criterion state (built with the same targets).
        optimizer: Receives its state (built over the same parameters, in the same order).
        states: Name -> object given to :func:`save` under the same name.
        rng: Restore the RNG states saved for this process's rank.
        rank: Which rank's RNG states to restore (default: this process's rank under
            ``torch.distributed``, else 0).

    Returns:
        The header (versions, hash, ``meta``).

    Raises:
        CheckpointError: (a ``ValueError``) for a truncated or corrupted file, a hash
            mismatch, or objects that do not fit it; nothing is changed.
        TypeError: if ``model`` is not an ``nn.Module``.
    """
    _check_types(model, pruner, optimizer)
    info, sections, tensors = _read(path)
    where = f"checkpoint {str(path)!r}"
    wanted = {"pruner": pruner, "optimizer": optimizer, "states": states, "rng": rng or None}
    absent = [name for name, obj in wanted.items() if obj is not None and name not in sections]
    if absent:
        raise CheckpointError(f"{where} holds no {', '.join(absent)} state; it holds "
                              f"{', '.join(sections)} (pass None / rng=False to skip)")
    model_state = _decode(sections["model"], tensors)
    check_state_dict(model, model_state, where)
    plan: list[tuple[Stateful, Any]] = []
    if pruner is not None:
        pruner_state = _decode(sections["pruner"], tensors)
        _check_pruner(pruner, pruner_state["masks"], where)
        plan.append((pruner, pruner_state))
    for name, obj in (states or {}).items():
        if name not in sections["states"]:
            raise CheckpointError(f"{where} holds no state named {name!r}; it holds "
                                  f"{sorted(sections['states'])}")
        plan.append((obj, _decode(sections["states"][name], tensors)))
    if optimizer is not None:
        _check_optimizer(optimizer, sections["optimizer"]["param_shapes"], where)
        plan.append((optimizer, _decode(sections["optimizer"]["state"], tensors)))
    rng_ranks = _decode(sections["rng"], tensors) if rng else {}
    r = _current_rank() if rank is None else rank
    if rng and str(r) not in rng_ranks:
        raise CheckpointError(f"{where} holds RNG states for ranks {sorted(rng_ranks)}, not "
                              f"for rank {r}; pass rng=False to keep the current ones")
    _apply(plan, model, model_state, rng_ranks.get(str(r)))
    return info


def _apply(plan: list[tuple[Stateful, Any]], model: nn.Module,
           model_state: Mapping[str, torch.Tensor], rng: Mapping[str, torch.Tensor] | None
           ) -> None:
    """Restore each object; on failure put back those already restored (the optimizer is
    last: its checks ran above, and copying its state for an undo would double memory)."""
    undo: list[Callable[[], Any]] = []
    try:
        for obj, state in plan:
            if isinstance(obj, Pruner):  # its state_dict is already a copy
                undo.append(functools.partial(obj.load_state_dict, obj.state_dict()))
            elif not isinstance(obj, torch.optim.Optimizer):
                undo.append(functools.partial(obj.load_state_dict,
                                              copy.deepcopy(obj.state_dict())))
            obj.load_state_dict(state)
        model.load_state_dict(model_state, strict=True)
        if rng is not None:
            set_rng_state(rng)
    except BaseException:
        for step in reversed(undo):
            # The original error is the one to report; an object that also refuses its
            # own previous state must not stop the others from being put back.
            with contextlib.suppress(Exception):
                step()
        raise

