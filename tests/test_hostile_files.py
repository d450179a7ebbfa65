"""Loading a hostile file is bounded: each crafted checkpoint of the set in
``tests/scripts/hostile_files.py`` is refused with ``CheckpointError`` within a second,
with peak RSS growth under 50 MB, and leaves the live model, pruner, optimizer and RNG as
they were. Measured in a fresh process (peak RSS through ``/proc/self/status``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "hostile_files.py"
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="peak RSS is measured through Linux /proc")


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("hostile")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["case"]: row for row in lines}


def test_the_set_covers_every_kind_of_crafted_file(rows: dict[str, dict]) -> None:
    assert len(rows) >= 25
    for kind in ("mask shape far beyond its bytes", "FIFO at the path",
                 "checkpoint header nested 100,000 deep", "no sections",
                 "RNG state its generator refuses", "NaN learning rate"):
        assert kind in rows


def test_every_crafted_file_is_refused_promptly_and_changes_nothing(rows: dict[str, dict]
                                                                    ) -> None:
    for case, row in rows.items():
        assert row["outcome"] == "refused", (case, row)
        assert row["seconds"] < 1.0, (case, row)
        # None where this kernel does not let a process reset its peak RSS.
        assert row["rss_growth_mb"] is None or row["rss_growth_mb"] < 50, (case, row)
        assert row["unchanged"], (case, row)


def test_refusals_name_the_file_and_the_problem(rows: dict[str, dict]) -> None:
    expected = {
        "mask shape far beyond its bytes": "a mask of shape \\[8192, 8192\\] needs 8388608",
        "FIFO at the path": "it is a FIFO, not a file",
        "device at the path": "it is a device",
        "directory at the path": "it is a directory",
        "safetensors header nested 100,000 deep": "nested too deeply",
        "checkpoint header nested 100,000 deep": "nested too deeply",
        "state nested 900 deep": "nested more than 64 levels",
        "no sections": "malformed: KeyError: 'sections'",
        "RNG state of the wrong size": "RNG state 'torch' must be torch.uint8 of shape",
        "RNG state its generator refuses": "refused by its generator",
        "optimizer state of the wrong shape": "'exp_avg' of parameter 0 has shape \\(7,\\)",
        "NaN learning rate": "learning rate nan",
        "criterion statistics of the wrong shape": "have shape \\(3,\\)",
        "criterion statistics holding Inf": "hold NaN or Inf",
    }
    for case, pattern in expected.items():
        assert re.search(pattern, rows[case]["message"]), (case, rows[case]["message"])
        assert ".safetensors" in rows[case]["message"], case
