"""A compacted Hugging Face model as a folder that loads again: safetensors, no pickle.

After :func:`~secateurs.prune_channels_` a model has fewer heads and feed-forward neurons
than its config says, so ``save_pretrained`` + ``from_pretrained`` fails on sizes (or,
with ``ignore_mismatched_sizes=True``, loads with silently re-initialised weights).
:func:`save_compacted` writes a folder that loads one of two ways, and says which:

- ``"config"``: every layer kept the same widths and the config can say so (its
  ``num_attention_heads``, ``intermediate_size`` and the like are updated; fields such as
  ``head_dim`` stay). A model built from the new config is checked, on the ``meta``
  device, to have exactly the compacted shapes. Plain
  ``transformers.AutoModel.from_pretrained(folder)`` then loads it.
- ``"recorded"``: the config cannot say it (layers differ, or the architecture derives
  the head width from ``hidden_size / num_attention_heads``, as BERT does). The original
  config is kept and the new width of every changed module is recorded;
  :func:`load_compacted` builds the model from the config, shrinks those modules (head
  counts set on the attention modules) and loads the weights strictly.

Either folder holds ``config.json``, ``model.safetensors`` (with the content hash of
:func:`secateurs.save` checkpoints in its metadata) and ``secateurs.json``: the path taken
and why, the widths before and after per module, and the hash of every file written
(tokenizer files too). :func:`load_compacted` checks them all before building anything,
reads JSON and raw tensor bytes only, and only instantiates classes that ship with
``transformers`` (never ``trust_remote_code``).

Example:
    >>> sc.prune_channels_(encoder, batch, 0.25)
    >>> saved = save_compacted(encoder, "small", tokenizer=tokenizer)
    >>> saved.kind, saved.reason
    >>> small = load_compacted("small")      # either kind
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, check_state_dict, write_atomic
from ..checkpoint.digest import content_digest
from ..checkpoint.header import HASH_KEY, versions
from .integrity import (
    FORMAT_VERSION,
    META_KEY,
    deduplicate,
    export_header,
    file_digest,
    read_verified,
    restore_aliases,
    write_hashed,
)
from .widths import Widths, apply_widths, build, config_changes, describe

__all__ = ["MANIFEST", "CompactedFolder", "load_compacted", "save_compacted"]

#: The file in the folder that records how it was saved.
MANIFEST = "secateurs.json"
_FORMAT = "secateurs.compacted"
_VERSION = 1
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_JSON_LIMIT = 1 << 26  # bytes: a JSON file larger than this is refused unread
# Weights in other formats would make from_pretrained read something else than ours.
_FOREIGN = (".bin", ".h5", ".msgpack", ".ckpt", ".pt", ".pth", ".index.json")


@dataclass(frozen=True)
class CompactedFolder:
    """What :func:`save_compacted` wrote.

    Attributes:
        folder: The folder.
        kind: ``"config"`` (plain ``from_pretrained`` loads it) or ``"recorded"`` (load it
            with :func:`load_compacted`).
        reason: Why, in words (for ``"recorded"``, what the config cannot express).
        config_changes: Config field -> ``[before, after]`` (``"config"`` only).
        modules: Module name -> attribute -> ``[before, after]``: the widths compaction
            changed, per layer.
        files: File name -> content hash, for every file written.
    """

    folder: Path
    kind: str
    reason: str
    config_changes: dict[str, list[int]]
    modules: dict[str, dict[str, list[Any]]]
    files: dict[str, str]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("saving and loading Hugging Face models needs transformers: "
                          "pip install 'secateurs[bench]' (or transformers)") from err
    return transformers


def _model_class(model: object, transformers: Any) -> type[nn.Module]:
    cls = type(model)
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {cls.__name__}")
    if not cls.__module__.startswith("transformers.") \
            or getattr(transformers, cls.__name__, None) is not cls:
        raise TypeError(f"{cls.__name__} ({cls.__module__}) is not a class of transformers "
                        "itself; load_compacted instantiates only those, never remote code")
    return cls


def _prepare(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} exists and is not a folder")
    stale = sorted(p.name for p in folder.glob("*") if p.name.endswith(_FOREIGN)
                   or (p.name.endswith(".safetensors") and p.name != _WEIGHTS))
    if stale:
        raise ValueError(f"folder {str(folder)!r} already holds weights {stale[:4]}, which "
                         "from_pretrained could read instead: use an empty folder")
    folder.mkdir(parents=True, exist_ok=True)


def _write_text(path: Path, text: str) -> str:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomic(path, write)
    return file_digest(path)


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != HASH_KEY}
    return content_digest(json.dumps(body, sort_keys=True), {})


def save_compacted(model: nn.Module, folder: str | os.PathLike[str], *,
                   tokenizer: Any = None) -> CompactedFolder:
    """Save a compacted Hugging Face model as a folder that loads again, without pickle.

    The path taken is in the result and in the folder's ``secateurs.json``:
    ``"config"`` when every layer kept the same widths and the updated config builds
    exactly these shapes (plain ``AutoModel.from_pretrained(folder)`` works, and
    :func:`load_compacted` too); ``"recorded"`` otherwise (per-layer widths, or a config
    that ties the head width to ``hidden_size``, as BERT's does): the original config and
    the per-module widths are saved, and only :func:`load_compacted` rebuilds it (plain
    ``from_pretrained`` fails on sizes). The model is not changed; each file is written
    atomically, ``secateurs.json`` last.

    Args:
        model: A ``transformers.PreTrainedModel`` (a class of transformers itself), e.g.
            after :func:`~secateurs.prune_channels_`.
        folder: Destination; created if needed. It must not hold other weight files.
        tokenizer: Saved beside (``tokenizer.save_pretrained(folder)``), its files hashed.

    Returns:
        A :class:`CompactedFolder`: kind, reason, the widths per module, file hashes.

    Raises:
        TypeError: for a model that is not a transformers model.
        ValueError: for a model that differs from its config in more than widths, or a
            folder holding other weights (nothing is written).
        ImportError: without transformers.
    """
    transformers = _transformers()
    cls = _model_class(model, transformers)
    config: Any = model.config
    widths = describe(model, build(cls, config, meta=True))
    changes, reason = config_changes(model, config, widths)
    kind = "recorded" if changes is None else "config"
    path = Path(folder)
    _prepare(path)
    files: dict[str, str] = {}
    if tokenizer is not None:
        for name in tokenizer.save_pretrained(str(path)):
            written = Path(name)
            if written.is_file() and written.parent.resolve() == path.resolve():
                files[written.name] = file_digest(written)
    files[_CONFIG] = _write_text(path / _CONFIG, _config_text(model, cls, changes or {}))
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():  # type: ignore[operator]
        files["generation_config.json"] = _write_text(path / "generation_config.json",
                                                      generation.to_json_string(use_diff=True))
    tensors, aliases = deduplicate(model.state_dict())
    header = {"format_version": FORMAT_VERSION, "aliases": aliases, "compaction": kind}
    files[_WEIGHTS] = write_hashed(path / _WEIGHTS, tensors,
                                   {"format": "pt", META_KEY: json.dumps(header)})[1]
    manifest: dict[str, Any] = {
        "format": _FORMAT, "format_version": _VERSION, "kind": kind, "reason": reason,
        "architecture": cls.__name__, "config_changes": changes or {},
        "modules": widths.modules, "files": files, "versions": dict(versions())}
    manifest[HASH_KEY] = _manifest_digest(manifest)
    _write_text(path / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return CompactedFolder(path, kind, reason, changes or {}, widths.modules, files)


def _config_text(model: nn.Module, cls: type[nn.Module], changes: dict[str, list[int]]
                 ) -> str:
    config: Any = copy.deepcopy(model.config)
    for field, (_, new) in changes.items():
        setattr(config, field, new)
    config.architectures = [cls.__name__]
    return str(config.to_json_string(use_diff=True))


# -- loading --------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > _JSON_LIMIT:
            raise CheckpointError(f"{str(path)!r} is {size} bytes, more than a JSON file "
                                  f"here may hold ({_JSON_LIMIT})")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err}") from None
    except ValueError as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {err}") from None


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"folder {str(folder)!r} has no {MANIFEST}: it was not written "
                              "by save_compacted (or the save did not finish)")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a {_FORMAT} record")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > _VERSION:
        raise CheckpointError(f"{str(path)!r} has format version "
                              f"{manifest.get('format_version')!r}; this secateurs reads up "
                              f"to {_VERSION}")
    if manifest.get(HASH_KEY) != _manifest_digest(manifest):
        raise CheckpointError(f"{str(path)!r} is corrupted: its content hash differs from the "
                              "recorded one")
    return manifest


def _check_files(folder: Path, files: dict[str, str]) -> None:
    for name, digest in files.items():
        if name == _WEIGHTS:
            continue  # its content hash is checked as it is read
        path = folder / name
        if Path(name).name != name or name in ("", ".", "..") or not path.is_file():
            raise CheckpointError(f"folder {str(folder)!r} lacks {name!r}, which {MANIFEST} "
                                  "lists")
        if file_digest(path) != digest:
            raise CheckpointError(f"{str(path)!r} is corrupted or was changed: its content "
                                  f"hash differs from the one in {MANIFEST}")


def _config_and_class(folder: Path, architecture: str, transformers: Any
                      ) -> tuple[Any, type[nn.Module]]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = folder / _CONFIG
    raw = _read_json(path)
    if not isinstance(raw, dict) or raw.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(f"{str(path)!r} names model type "
                              f"{raw.get('model_type') if isinstance(raw, dict) else None!r}, "
                              "which this transformers does not ship")
    if raw.get("auto_map"):
        raise CheckpointError(f"{str(path)!r} names custom code (auto_map); load_compacted "
                              "never runs code from a folder")
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    cls = getattr(transformers, architecture, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel) \
            or not cls.__module__.startswith("transformers.") \
            or not isinstance(config, getattr(cls, "config_class", ())) \
            or (raw.get("architectures") or [architecture])[0] != architecture:
        raise CheckpointError(f"{MANIFEST} names architecture {architecture!r}, which is not "
                              f"a transformers model for {str(path)!r}")
    return config, cls


def _float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    kinds = {t.dtype for t in state.values() if t.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else None


def _rebuild(cls: type[nn.Module], config: Any, widths: Widths,
             state: dict[str, torch.Tensor], *, meta: bool) -> nn.Module:
    model = build(cls, config, meta=meta)
    dtype = _float_dtype(state)
    if dtype is not None:
        model.to(dtype)
    try:
        apply_widths(model, widths.modules, {k: t.shape for k, t in state.items()})
    except KeyError as err:
        raise CheckpointError(f"{MANIFEST} records {err}, which a {cls.__name__} built from "
                              "the config does not have") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{MANIFEST} records widths that cannot be applied: {err}"
                              ) from None
    return model


def load_compacted(folder: str | os.PathLike[str]) -> nn.Module:
    """Load a folder written by :func:`save_compacted`, of either kind, in eval mode.

    The folder's record, config, weights and tokenizer files are checked against their
    content hashes first; then the model is built from the config (the class named in
    it, which must ship with transformers), on the ``meta`` device, the recorded widths
    applied (per-layer head counts on the attention modules, narrower layers), and its
    shapes checked against the weights file, all before any memory is allocated for the
    model. Only then is it built for real and the weights loaded strictly.

    Args:
        folder: The folder.

    Returns:
        The model, with the compacted widths and the saved weights.

    Raises:
        CheckpointError: (a ``ValueError``, naming the file) for a missing, changed or
            corrupted file, an architecture transformers does not ship, custom code, or
            weights that do not fit.
        ImportError: without transformers.
    """
    transformers = _transformers()
    path = Path(folder)
    manifest = _read_manifest(path)
    files = dict(manifest.get("files") or {})
    _check_files(path, files)
    weights = path / _WEIGHTS
    where = f"file {str(weights)!r}"
    metadata, state = read_verified(weights, required=True)
    if metadata.get(HASH_KEY) != files.get(_WEIGHTS):
        raise CheckpointError(f"{where} is not the weights file this folder was saved with "
                              f"(its content hash differs from the one in {MANIFEST})")
    restore_aliases(state, export_header(metadata, where)["aliases"], where)
    config, cls = _config_and_class(path, str(manifest.get("architecture")), transformers)
    widths = Widths(dict(manifest.get("modules") or {}), {})
    check_state_dict(_rebuild(cls, config, widths, state, meta=True), state, where)
    model = _rebuild(cls, config, widths, state, meta=False)
    check_state_dict(model, state, where)
    model.load_state_dict(state, strict=True)
    return model.eval()
