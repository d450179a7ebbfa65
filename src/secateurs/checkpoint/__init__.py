"""Checkpoints that resume a pruning run exactly and never execute code when read.

One file per checkpoint, in the safetensors format: its tensors are the model's state,
the optimizer's state, the pruner's masks (``torch.bool``, bit-packed eight to a byte),
criterion statistics and RNG states; its header holds, as JSON, everything else (steps,
hyper-parameters, controller and schedule state) with references to the tensors, the
versions that wrote it and a SHA-256 of the content. Reading parses JSON and raw tensor
bytes only: nothing is unpickled, so a file from elsewhere cannot run code.

Writes are atomic (an exclusively created temporary file, written through its descriptor,
flushed, ``fsync``-ed, renamed over the destination): a process killed mid-write leaves
the previous checkpoint intact, concurrent saves to one path never share a temporary
file, and what a killed save left behind is removed by the next save to that path.
Loading reads one open file, refuses anything that is not a regular file, checks its
size, layout and every declared shape against the live objects before reading a tensor
(a crafted file cannot make it allocate more than it holds), then the content hash and
the values, all before changing anything; disk and I/O errors are ``OSError``, a bad file
a :class:`CheckpointError`.

Under ``torch.distributed`` (DDP), :func:`save_distributed` writes from one rank with
every rank's RNG states and criterion statistics, and :func:`load_distributed` reads on
every rank, each restoring its own; both are collectives, called on all ranks.

The package, one module per concern: :mod:`.files` (save, load and their checks),
:mod:`.container` (the safetensors layout, read and written through one file),
:mod:`.codec` (nested state to JSON and flat tensors), :mod:`.digest` (the content hash),
:mod:`.atomic` (atomic writes), :mod:`.rng` (generator states), :mod:`.ranks`
(data-parallel checkpoints) and :mod:`.header` (the format, its error and header).

Example:
    >>> sc.save("run.safetensors", model, pruner, optimizer, states={"lr": scheduler})
    >>> sc.load("run.safetensors", model, pruner, optimizer, states={"lr": scheduler})
"""

from __future__ import annotations

from .atomic import sweep_orphans, write_atomic, write_atomic_stream
from .container import read_header
from .files import check_state_dict, load, read_info, save
from .header import FORMAT, FORMAT_VERSION, CheckpointError, CheckpointInfo
from .ranks import gather_criterion_states, load_distributed, save_distributed
from .rng import gather_rng_states, rng_state, set_rng_state

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "check_state_dict",
    "gather_criterion_states",
    "gather_rng_states",
    "load",
    "load_distributed",
    "read_header",
    "read_info",
    "rng_state",
    "save",
    "save_distributed",
    "set_rng_state",
    "sweep_orphans",
    "write_atomic",
    "write_atomic_stream",
]
