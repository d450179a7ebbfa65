"""Gradual pruning under DistributedDataParallel (gloo, CPU); launched by
``tests/test_distributed.py`` with ``python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/scripts/ddp_train.py OUT_DIR``.

Each rank trains on its half of every global batch and writes ``OUT_DIR/rank{r}.json``:
fingerprints of its masks and weights after training, for each criterion, and (rank 0)
how far they are from a single process trained on the whole global batches; then a
checkpoint written by rank 0 and read back by every rank; runs resumed from a checkpoint
taken between two mask updates against uninterrupted ones; and a save whose writing rank
fails.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import secateurs as sc
from secateurs import checkpoint, distributed
from secateurs.calibration import calibrate
from secateurs.criteria import get_criterion
from secateurs.schedules import Cubic

STEPS = 12
GLOBAL_BATCH = 16
RESUME_AT = 4  # steps before the checkpoint: masks were updated at step 2, next at 4
CASES = {  # name -> (criterion options, sync)
    "magnitude": ({"spec": "magnitude"}, "reduce"),
    "contribution": ({"spec": "contribution"}, "reduce"),
    "random_per_rank": ({"spec": "random"}, "broadcast"),
    "contribution_plain": ({"spec": "contribution"}, "plain"),  # pruner.step() alone
    # The control: statistics kept per rank, plain pruner.step().
    "contribution_unsynced": ({"spec": "contribution", "sync": False}, "none"),
}


def _unsynced(pruner: sc.Pruner) -> bool:
    updated = pruner.step()
    if updated:
        try:
            distributed.check_masks_agree(pruner.masks)
        except RuntimeError:
            MISMATCHES.append(pruner.step_count)
    return updated


MISMATCHES: list[int] = []


def build(criterion: Any) -> tuple[nn.Module, torch.optim.Optimizer, sc.Pruner]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = sc.Pruner(model, Cubic(initial=0.0, final=0.75, begin_step=0, end_step=8),
                       criterion, scope="layer", update_every=2, optimizer=optimizer)
    return model, optimizer, pruner


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def make(case: str, rank: int) -> tuple[nn.Module, torch.optim.Optimizer, sc.Pruner]:
    options, sync = CASES[case]
    options = dict(options)
    spec = options.pop("spec")
    if sync == "broadcast":  # per-rank state: only broadcast agrees
        options["seed"] = rank if case == "random_per_rank" else 0
    return build(get_criterion(spec, **options))


def run(case: str, objects: tuple[nn.Module, torch.optim.Optimizer, sc.Pruner], world: int,
        rank: int, start: int = 0, stop: int = STEPS) -> None:
    """Steps ``start`` to ``stop`` of the run on this rank's half of each global batch."""
    model, optimizer, pruner = objects
    sync = CASES[case][1]
    ddp = DistributedDataParallel(model) if world > 1 else model
    local = GLOBAL_BATCH // world
    for x, y in batches()[start:stop]:
        xs, ys = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(xs), ys).backward()
        optimizer.step()
        if sync == "none":
            _unsynced(pruner)
        elif sync == "plain":
            pruner.step()
        else:
            distributed.step(pruner, sync=sync)


def train(case: str, world: int, rank: int) -> tuple[nn.Module, sc.Pruner]:
    objects = make(case, rank)
    run(case, objects, world, rank)
    return objects[0], objects[2]


def resumed(case: str, out: Path, world: int, rank: int) -> dict[str, Any]:
    """Stop after ``RESUME_AT`` steps (each rank's statistics then hold a batch the masks
    have not seen), save, load into fresh objects, finish: the same as never stopping."""
    model, pruner = train(case, world, rank)
    first = make(case, rank)
    run(case, first, world, rank, stop=RESUME_AT)
    path = out / f"resume-{case}.safetensors"
    checkpoint.save_distributed(path, first[0], first[2], first[1])
    fresh = make(case, rank)
    checkpoint.load_distributed(path, fresh[0], fresh[2], fresh[1])
    run(case, fresh, world, rank, start=RESUME_AT)
    return {"weights_equal": digest(fresh[0].state_dict()) == digest(model.state_dict()),
            "masks_equal": digest(dict(fresh[2].masks)) == digest(dict(pruner.masks)),
            "masks": digest(dict(fresh[2].masks)),
            "mask_elements_differ": sum(int((fresh[2].masks[n] != pruner.masks[n]).sum())
                                        for n in pruner.masks)}


def writer_fails(out: Path) -> dict[str, Any]:
    """Rank 0 cannot write (no such folder): every rank must raise, at once."""
    model, optimizer, pruner = build(get_criterion("magnitude"))
    start = time.monotonic()
    try:
        checkpoint.save_distributed(out / "absent" / "x.safetensors", model, pruner, optimizer)
        raised, message = None, ""
    except Exception as err:
        raised, message = type(err).__name__, str(err)
    return {"raised": raised, "message": message, "seconds": time.monotonic() - start}


def reference(case: str) -> tuple[nn.Module, sc.Pruner]:
    """One process, whole global batches, plain ``pruner.step()``."""
    spec = CASES[case][0]["spec"]
    # One process: its statistics are its own (this runs on rank 0 alone).
    model, optimizer, pruner = build(get_criterion(spec, **({"sync": False}
                                                            if spec == "contribution" else {})))
    for x, y in batches():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
    return model, pruner


def one_shot_statistics(rank: int, world: int) -> dict[str, Any]:
    """Each rank calibrates on its shard; the all-reduced statistics equal one process's
    statistics over every batch, and so do the contribution scores made from them."""
    model, _, _ = build("magnitude")
    targets = sc.targets.resolve_targets(model)
    local = GLOBAL_BATCH // world
    shards = [x[rank * local:(rank + 1) * local] for x, _ in batches()]
    stats = calibrate(model, shards, targets, progress=False)
    distributed.all_reduce_stats_(stats)
    whole = calibrate(model, [x for x, _ in batches()], targets, progress=False)
    criterion = get_criterion("contribution")
    criterion.calibrate(model, targets, [], stats=stats, progress=False)  # type: ignore[attr-defined]
    reference = get_criterion("contribution")
    reference.calibrate(model, targets, [], stats=whole, progress=False)  # type: ignore[attr-defined]
    scores = {t.name: criterion.score(t) for t in targets}
    return {
        "counts_equal": all(stats[n].count == whole[n].count for n in stats),
        "max_sum_rel_diff": max(
            float(((stats[n].power_sums[p] - whole[n].power_sums[p]).abs()
                   / whole[n].power_sums[p].abs().clamp_min(1e-12)).max())
            for n in stats for p in stats[n].power_sums),
        "max_score_diff": max(float((scores[t.name] - reference.score(t)).abs().max())
                              for t in targets),
        "scores": digest(scores),
    }


def round_trip(out: Path, rank: int) -> dict[str, Any]:
    """Rank 0 writes a checkpoint; every rank reads it into fresh objects."""
    model, pruner = train("magnitude", dist.get_world_size(), rank)
    optimizer = pruner.optimizer
    assert optimizer is not None
    torch.manual_seed(100 + rank)  # distinct RNG streams per rank, restored per rank
    rng_at_save = torch.get_rng_state()
    checkpoint.save_distributed(out / "ddp.safetensors", model, pruner, optimizer)
    torch.manual_seed(999)
    fresh, fresh_optimizer, fresh_pruner = build("magnitude")
    checkpoint.load_distributed(out / "ddp.safetensors", fresh, fresh_pruner, fresh_optimizer)
    return {
        "weights_equal": digest(fresh.state_dict()) == digest(model.state_dict()),
        "masks_equal": digest(dict(fresh_pruner.masks)) == digest(dict(pruner.masks)),
        "step_equal": fresh_pruner.step_count == pruner.step_count,
        "rng_restored": torch.equal(torch.get_rng_state(), rng_at_save),
        "readable": checkpoint.read_info(out / "ddp.safetensors").sections[0] == "model",
    }


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    # A bounded timeout: a rank left waiting fails the test in a minute, not in thirty.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank, "world": world, "cases": {}}
    for case in CASES:
        model, pruner = train(case, world, rank)
        row = {"masks": digest(dict(pruner.masks)), "weights": digest(model.state_dict()),
               "sparsity": pruner.sparsity()}
        if rank == 0 and CASES[case][1] in ("reduce", "plain"):
            ref_model, ref_pruner = reference(case)
            row["masks_equal_single"] = all(torch.equal(pruner.masks[n], ref_pruner.masks[n])
                                            for n in pruner.masks)
            row["max_weight_diff_single"] = max(
                float((a - b).abs().max()) for a, b in
                zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True))
        result["cases"][case] = row
    result["mismatches_detected_unsynced"] = len(MISMATCHES)
    result["one_shot"] = one_shot_statistics(rank, world)
    result["checkpoint"] = round_trip(out, rank)
    result["resume"] = {case: resumed(case, out, world, rank)
                        for case in ("contribution", "contribution_plain")}
    result["writer_fails"] = writer_fails(out)
    dist.barrier()  # a rank that returned early from the failed save would meet the others here
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
