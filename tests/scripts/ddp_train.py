"""Gradual pruning under DistributedDataParallel (gloo, CPU); launched by
``tests/test_distributed.py`` with ``python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/scripts/ddp_train.py OUT_DIR``.

Each rank trains on its half of every global batch and writes ``OUT_DIR/rank{r}.json``:
fingerprints of its masks and weights after training, for each criterion, and (rank 0)
how far they are from a single process trained on the whole global batches; then a
checkpoint written by rank 0 and read back by every rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
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
CASES = {  # name -> (criterion options, sync)
    "magnitude": ({"spec": "magnitude"}, "reduce"),
    "contribution": ({"spec": "contribution"}, "reduce"),
    "random_per_rank": ({"spec": "random"}, "broadcast"),
    "contribution_unsynced": ({"spec": "contribution"}, "none"),  # the control
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


def train(case: str, world: int, rank: int) -> tuple[nn.Module, sc.Pruner]:
    options, sync = CASES[case]
    seed = rank if case == "random_per_rank" else 0  # per-rank state: only broadcast agrees
    criterion = get_criterion(options["spec"], **({"seed": seed} if sync == "broadcast" else {}))
    model, optimizer, pruner = build(criterion)
    ddp = DistributedDataParallel(model) if world > 1 else model
    local = GLOBAL_BATCH // world
    for x, y in batches():
        xs, ys = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(xs), ys).backward()
        optimizer.step()
        if sync == "none":
            _unsynced(pruner)
        else:
            distributed.step(pruner, sync=sync)
    return model, pruner


def reference(case: str) -> tuple[nn.Module, sc.Pruner]:
    """One process, whole global batches, plain ``pruner.step()``."""
    options, _ = CASES[case]
    model, optimizer, pruner = build(get_criterion(options["spec"]))
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
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank, "world": world, "cases": {}}
    for case in CASES:
        model, pruner = train(case, world, rank)
        row = {"masks": digest(dict(pruner.masks)), "weights": digest(model.state_dict()),
               "sparsity": pruner.sparsity()}
        if rank == 0 and CASES[case][1] == "reduce":
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
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
