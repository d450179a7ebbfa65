"""Pruning under DDP: one set of masks on every rank, equal to a single process where the
maths allows it; checkpoints written by one rank and read by all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs import checkpoint, distributed

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["magnitude", "contribution", "random_per_rank",
                                  "contribution_plain"])
def test_masks_and_weights_identical_on_every_rank(ranks: list[dict], case: str) -> None:
    first, second = (r["cases"][case] for r in ranks)
    assert first["sparsity"] == pytest.approx(0.75)
    assert first["masks"] == second["masks"]
    assert first["weights"] == second["weights"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["magnitude", "contribution", "contribution_plain"])
def test_ddp_equals_one_process_on_the_global_batch(ranks: list[dict], case: str) -> None:
    row = ranks[0]["cases"][case]
    assert row["masks_equal_single"]
    # Gradients are averaged in another order than one process sums them: rounding only.
    assert row["max_weight_diff_single"] < 1e-12


@pytest.mark.slow
def test_resume_between_mask_updates_is_bit_for_bit(ranks: list[dict]) -> None:
    # Each rank's statistics of the batch after the last update are in the checkpoint.
    for case in ("contribution", "contribution_plain"):
        rows = [r["resume"][case] for r in ranks]
        for row in rows:
            assert row["mask_elements_differ"] == 0, (case, row)
            assert row["weights_equal"] and row["masks_equal"], (case, row)
        assert rows[0]["masks"] == rows[1]["masks"]


@pytest.mark.slow
def test_a_failing_writer_fails_every_rank_at_once(ranks: list[dict]) -> None:
    writer, other = (r["writer_fails"] for r in ranks)
    assert writer["raised"] == "FileNotFoundError"
    assert other["raised"] == "CheckpointError"
    assert "rank 0 failed to write" in other["message"]
    assert "FileNotFoundError" in other["message"]
    assert writer["seconds"] < 10 and other["seconds"] < 10


@pytest.mark.slow
def test_unsynced_data_criterion_diverges_and_is_detected(ranks: list[dict]) -> None:
    first, second = (r["cases"]["contribution_unsynced"] for r in ranks)
    assert first["masks"] != second["masks"]
    assert ranks[0]["mismatches_detected_unsynced"] > 0


@pytest.mark.slow
def test_all_reduced_calibration_equals_one_process_on_every_batch(ranks: list[dict]) -> None:
    first, second = (r["one_shot"] for r in ranks)
    # Per-batch sums are reduced in float32 over 8 rows here, 16 there: rounding only.
    assert first["counts_equal"] and first["max_sum_rel_diff"] < 1e-6
    assert first["max_score_diff"] < 1e-6
    assert first["scores"] == second["scores"]


@pytest.mark.slow
def test_checkpoint_written_by_rank0_is_read_by_all(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["checkpoint"] == {"weights_equal": True, "masks_equal": True,
                                   "step_equal": True, "rng_restored": True, "readable": True}


def test_single_process_step_is_the_plain_step(mlp: nn.Module) -> None:
    a = sc.Pruner(mlp, 0.5)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.step(a) is True
    assert a.sparsity() == pytest.approx(0.5, abs=0.01)
    assert distributed.unwrap(mlp) is mlp


def test_unknown_sync_is_refused_before_stepping(mlp: nn.Module) -> None:
    pruner = sc.Pruner(mlp, 0.5)
    before = [p.clone() for p in mlp.parameters()]
    with pytest.raises(ValueError, match="'gather'.*reduce, broadcast"):
        distributed.step(pruner, sync="gather")
    assert pruner.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.parameters(), strict=True))


def test_rng_states_gathered_for_this_rank_only() -> None:
    states = checkpoint.gather_rng_states()
    assert list(states) == [0]
    assert torch.equal(states[0]["torch"], torch.get_rng_state())


def test_single_process_distributed_checkpoint_round_trips(tmp_path: Path,
                                                           mlp: nn.Module) -> None:
    pruner = sc.Pruner(mlp, 0.5)
    pruner.step()
    info = checkpoint.save_distributed(tmp_path / "c.safetensors", mlp, pruner)
    assert info is not None and info.sections == ("model", "pruner", "rng")
    torch.manual_seed(7)
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    fresh_pruner = sc.Pruner(fresh, 0.5)
    checkpoint.load_distributed(tmp_path / "c.safetensors", fresh, fresh_pruner)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 mlp.state_dict().values(), strict=True))
    assert all(torch.equal(fresh_pruner.masks[n], pruner.masks[n]) for n in pruner.masks)


@pytest.mark.parametrize(("old", "new"), [("save", "save_distributed"),
                                          ("load", "load_distributed"),
                                          ("gather_rng_states", "gather_rng_states")])
def test_checkpoint_functions_moved_to_checkpoint_warn_and_forward(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"secateurs.checkpoint.{new}"):
        moved = getattr(distributed, old)
    assert moved is getattr(checkpoint, new)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        distributed.nope  # noqa: B018
