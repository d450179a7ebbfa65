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

Under ``torch.distributed`` (DDP), :func:`save_distributed` writes from one rank with
every rank's RNG states and :func:`load_distributed` reads on every rank; both are
collectives, called on all ranks.

The package, one module per concern: :mod:`.files` (save, load and their checks),
:mod:`.codec` (nested state to JSON and flat tensors), :mod:`.digest` (the content hash),
:mod:`.atomic` (atomic writes), :mod:`.rng` (generator states), :mod:`.ranks`
(data-parallel checkpoints) and :mod:`.header` (the format, its error and header).

Example:
    >>> sc.save("run.safetensors", model, pruner, optimizer, states={"lr": scheduler})
    >>> sc.load("run.safetensors", model, pruner, optimizer, states={"lr": scheduler})
"""

from __future__ import annotations

from .atomic import write_atomic
from .files import check_state_dict, load, read_info, save
from .header import FORMAT, FORMAT_VERSION, CheckpointError, CheckpointInfo, read_header
from .ranks import load_distributed, save_distributed
from .rng import gather_rng_states, rng_state, set_rng_state

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "check_state_dict",
    "gather_rng_states",
    "load",
    "load_distributed",
    "read_header",
    "read_info",
    "rng_state",
    "save",
    "save_distributed",
    "set_rng_state",
    "write_atomic",
]
